"""`train_step.global_norm` and `clip_by_global_norm`: optax's norm and clipping, summed so
that a GPU runs one reduction kernel per large array instead of two."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax.train_step import clip_by_global_norm, global_norm


def _tree(seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    return {"kernel": jax.random.normal(keys[0], (48, 24)),
            "conv": {"w": jax.random.normal(keys[1], (3, 5, 7)), "b": jax.random.normal(keys[2], (7,))},
            "scalar": jnp.float32(-2.5), "empty": jnp.zeros((0, 4)), "packed": jax.random.normal(keys[3], (1000,)),
            "wide": 3.0 * jax.random.normal(keys[4], (2, 4096))}


def test_global_norm_is_optaxs():
    tree = _tree()
    np.testing.assert_allclose(jax.jit(global_norm)(tree), optax.tree.norm(tree), rtol=1e-6)
    assert float(global_norm({})) == 0.0


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_a_non_finite_leaf_makes_the_norm_non_finite(bad):
    tree = _tree()
    tree["conv"]["w"] = tree["conv"]["w"].at[1, 2, 3].set(bad)
    assert not jnp.isfinite(jax.jit(global_norm)(tree))


def test_one_whole_array_reduction_when_compiled():
    """Row sums per array, then one sum to a scalar. optax's form compiles to a scalar sum per
    array; without the barrier XLA's simplifier turns ours back into that (both measured here,
    so the test shows what the barrier is for)."""
    tree = _tree()

    def scalar_sums(fn):
        return len(re.findall(r"= f32\[\] reduce\(", jax.jit(fn).lower(tree).compile().as_text()))

    assert scalar_sums(global_norm) == 1
    assert scalar_sums(optax.tree.norm) > 4


@pytest.mark.parametrize("max_norm", [1.0, 1e4])  # clipped, and left as it is
def test_clip_by_global_norm_is_optaxs(max_norm):
    tree = _tree()
    ours, theirs = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    state = ours.init(tree)
    assert state == theirs.init(tree)  # the same (empty) state: checkpoints carry over
    clipped, _ = jax.jit(ours.update)(tree, state)
    expected, _ = theirs.update(tree, state)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7), clipped, expected)
    norm = float(optax.tree.norm(clipped))
    assert norm == pytest.approx(min(max_norm, float(optax.tree.norm(tree))), rel=1e-5)
