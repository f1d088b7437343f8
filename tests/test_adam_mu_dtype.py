"""`optim.mu_dtype`: Adam's first moment stored in bfloat16. The update of a step uses that
step's float32 moment; only what is kept for the next step is rounded. Checked against Adam
written out in NumPy, through the train step (packed small arrays too), a run checkpoint, and
the experiment config."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from mtjax import packed_params
from mtjax.config import tiny_model_config
from mtjax.models.hiccap import init_variables
from mtjax.mtl.registry import make_weighting
from mtjax.run_checkpoints import RunCheckpointer
from mtjax.train_step import init_train_state, make_optimizer, make_train_step
from tests._support import random_batch

LR, B1, B2, EPS = 1e-2, 0.9, 0.999, 1e-8


def _adam_reference(params, grads, mu_dtype):
    """Adam in NumPy (float64 arithmetic on float32 inputs), the stored moment rounded to
    `mu_dtype` after each step, as the option promises."""
    p = params.astype(np.float64)
    mu = np.zeros_like(p)
    nu = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        mu = B1 * mu + (1 - B1) * g
        nu = B2 * nu + (1 - B2) * g * g
        p = p - LR * (mu / (1 - B1 ** t)) / (np.sqrt(nu / (1 - B2 ** t)) + EPS)
        mu = mu.astype(mu_dtype).astype(np.float64)
    return p, mu


def test_the_stored_moment_is_rounded_and_the_update_follows_adam():
    rng = np.random.default_rng(0)
    params = rng.normal(size=(64,)).astype(np.float32)
    # Gradients whose first moment is not representable in bf16, and whose sign flips, so
    # that the rounding of the stored moment shows in the next update.
    grads = [rng.normal(size=(64,)).astype(np.float32) * s for s in (1.0, -0.7, 1.3, 0.01)]
    results = {}
    for name, dtype in (("float32", None), ("bfloat16", jnp.bfloat16)):
        tx = make_optimizer("adam", lr=LR, b1=B1, b2=B2, eps=EPS, mu_dtype=dtype)
        p = jnp.asarray(params)
        state = tx.init(p)
        for g in grads:
            updates, state = tx.update(jnp.asarray(g), state, p)
            p = optax.apply_updates(p, updates)
        mu = optax.tree_utils.tree_get(state, "mu")
        nu = optax.tree_utils.tree_get(state, "nu")
        assert mu.dtype == (dtype or jnp.float32) and nu.dtype == jnp.float32
        results[name] = (np.asarray(p), np.asarray(mu, np.float64))
    for name, mu_dtype in (("float32", np.float32), ("bfloat16", ml_dtypes.bfloat16)):
        p_ref, mu_ref = _adam_reference(params, grads, mu_dtype)
        # float32 arithmetic against float64 over four steps of size ~lr: ~1e-7 absolute.
        np.testing.assert_allclose(results[name][0], p_ref, rtol=0, atol=2e-6, err_msg=name)
        np.testing.assert_allclose(results[name][1], mu_ref, rtol=1e-6, atol=1e-9, err_msg=name)
    # The rounding matters: the two runs' parameters differ by more than float32 noise.
    assert np.max(np.abs(results["float32"][0] - results["bfloat16"][0])) > 1e-5


CONFIG = tiny_model_config()
T = len(CONFIG.tasks)
MASK = np.ones(T, np.float32)


@functools.lru_cache(maxsize=None)
def _train(mu_dtype, steps: int = 2, pack: bool = True):
    """(state after `steps` train steps, the parameters after each): one compile per setting
    for the module. The small arrays packed, as experiments run by default."""
    weighting = make_weighting("unweighted")
    tx = make_optimizer("adam", lr=1e-3, eps=1e-3, mu_dtype=mu_dtype)
    variables = init_variables(CONFIG, jax.random.PRNGKey(0))
    state = init_train_state(variables, tx, weighting, None, num_tasks=T, rng=jax.random.PRNGKey(1),
                             pack_small_arrays=pack)
    step = jax.jit(make_train_step(CONFIG, tx, weighting, pack_small_arrays=pack))
    params = []
    for i in range(steps):
        state, metrics = step(state, random_batch(CONFIG, 4, seed=i), MASK)
        assert int(metrics["finite"]) == 1
        params.append(jax.tree_util.tree_map(np.asarray, state.params))
    return state, params


def _mu(state):
    return optax.tree_utils.tree_get(state.opt_state, "mu")["model"]


def test_train_step_keeps_a_bf16_first_moment():
    state16, params16 = _train(jnp.bfloat16)
    state32, params32 = _train(None)
    mu16, mu32 = _mu(state16), _mu(state32)
    # both parts of the packed moment: the large arrays and the small vector
    assert isinstance(mu16, packed_params.Packed) and mu16.small.size > 0
    assert {x.dtype for x in jax.tree_util.tree_leaves(mu16)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(mu32)} == {jnp.dtype(jnp.float32)}
    nu16 = optax.tree_utils.tree_get(state16.opt_state, "nu")["model"]
    assert {x.dtype for x in jax.tree_util.tree_leaves(nu16)} == {jnp.dtype(jnp.float32)}
    # Step 1 updates with the float32 moment in both runs: the same parameters (XLA may
    # fuse the two programs differently: one ulp). Its stored moment is the float32 run's,
    # rounded to bf16.
    for a, b in zip(jax.tree_util.tree_leaves(params16[0]), jax.tree_util.tree_leaves(params32[0])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    # After step 2 the runs part, by about what a bf16 moment's rounding (2⁻⁹ relative)
    # moves an update of size lr: far under the update itself.
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree_util.tree_leaves(params32[1]), jax.tree_util.tree_leaves(params32[0])))
    parted = max(float(np.max(np.abs(a - b))) for a, b in
                 zip(jax.tree_util.tree_leaves(params16[1]), jax.tree_util.tree_leaves(params32[1])))
    assert 0 < parted < 0.05 * moved


def test_bf16_moment_round_trips_through_a_run_checkpoint_and_casts_on_resume(tmp_path):
    state, _ = _train(jnp.bfloat16)
    variables = init_variables(CONFIG, jax.random.PRNGKey(0))
    ck = RunCheckpointer(tmp_path / "checkpoints", async_save=False)
    try:
        ck.save(0, {"train": state}, variables, CONFIG, {"epoch": 0}, 0.5)
        like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
        same, _ = ck.restore(0, jax.tree_util.tree_map(like, {"train": state}))
        # A run resumed with optim.mu_dtype=float32 asks for a float32 moment: cast, exactly.
        state32, _ = _train(None)
        widened, _ = ck.restore(0, jax.tree_util.tree_map(like, {"train": state32}))
    finally:
        ck.close()
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves({"train": state})):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(_mu(widened["train"])), jax.tree_util.tree_leaves(_mu(state))):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))


def test_experiment_setting_reaches_the_optimizer():
    from mtjax.experiment import ConfigError, ExperimentConfig
    from mtjax.train import build_optimizer

    base = {"name": "t", "data": {"root": "d"}}
    assert ExperimentConfig.from_dict(base).optim.mu_dtype == "float32"
    params = {"w": jnp.ones((2, 3))}
    for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        exp = ExperimentConfig.from_dict({**base, "optim": {"mu_dtype": name}})
        mu = optax.tree_utils.tree_get(build_optimizer(exp).init(params), "mu")
        assert mu["w"].dtype == dtype
    with pytest.raises(ConfigError, match="mu_dtype"):
        ExperimentConfig.from_dict({**base, "optim": {"mu_dtype": "float8"}})
