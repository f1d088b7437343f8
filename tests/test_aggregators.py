"""Gradient aggregators: defining properties, hand-computed examples, optax plumbing.

Expected values come from the math, computed independently in numpy/scipy (scipy
SLSQP for MGDA/CAGrad, scipy NNLS for UPGrad's projections).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from scipy import optimize

from mtjax.mtl import aggregators as A
from mtjax.mtl.registry import AGGREGATORS, make_aggregator

ALL = sorted(AGGREGATORS)
# One gradient length for the random examples so compilations are shared across tests.
P = 12


def agg(name, m, state=None, **opts):
    out, state = A.aggregate_fn(name, **opts).apply(jnp.asarray(m, jnp.float32), state)
    return np.asarray(out, np.float64), state


def pad(m):
    """Hand examples padded with zero coordinates to length P (shares compilations)."""
    m = np.asarray(m, np.float64)
    return np.concatenate([m, np.zeros(m.shape[:-1] + (P - m.shape[-1],))], axis=-1)


def weights_of(out, m):
    """Recover the combination weights w from out = w @ m (m has full row rank)."""
    return np.linalg.lstsq(m.T, out, rcond=None)[0]


jit_pcgrad_coefficients = jax.jit(A.pcgrad_coefficients)
jit_gradvac_coefficients = jax.jit(A.gradvac_coefficients, static_argnames="beta")


def random_tasks(t, p=P, conflict=False, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(t, p))
    if conflict:  # an almost opposite pair: ill-conditioned Gram matrix
        m[1] = -0.8 * m[0] + 0.1 * rng.normal(size=p)
    return m


def gram64(m):
    return np.asarray(m, np.float64) @ np.asarray(m, np.float64).T


# ----------------------------------------------------------------- sum / mean


def test_sum_and_mean_hand_example():
    m = pad([[1.0, 2.0, -3.0], [3.0, -2.0, 1.0]])
    np.testing.assert_allclose(agg("sum", m)[0], pad([4.0, 0.0, -2.0]))
    np.testing.assert_allclose(agg("mean", m)[0], pad([2.0, 0.0, -1.0]))


# ----------------------------------------------------------------- PCGrad


def test_pcgrad_two_task_closed_form():
    # g1.g2 = -1 < 0: g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1).
    m = pad([[1.0, 0.0], [-1.0, 1.0]])
    np.testing.assert_allclose(agg("pcgrad", m)[0], pad([0.5, 1.5]), atol=1e-6)
    # Random conflicting pairs: closed form g_i - min(g_i.g_j, 0)/|g_j|^2 g_j, summed.
    for seed in range(5):
        g1, g2 = random_tasks(2, conflict=True, seed=seed)
        d = g1 @ g2
        want = (g1 - min(d, 0) / (g2 @ g2) * g2) + (g2 - min(d, 0) / (g1 @ g1) * g1)
        np.testing.assert_allclose(agg("pcgrad", np.stack([g1, g2]))[0], want, rtol=1e-5,
                                   atol=1e-5)


def test_pcgrad_no_conflict_remains_for_two_tasks():
    for seed in range(5):
        m = random_tasks(2, conflict=True, seed=seed)
        assert m[0] @ m[1] < 0
        c = np.asarray(jit_pcgrad_coefficients(jnp.asarray(gram64(m), jnp.float32),
                                               jnp.array([[0, 1], [1, 0]])))
        proj = c @ m
        assert proj[0] @ m[1] >= -1e-5 * np.linalg.norm(m[1]) ** 2
        assert proj[1] @ m[0] >= -1e-5 * np.linalg.norm(m[0]) ** 2


def test_pcgrad_three_tasks_given_orders_matches_sequential_numpy():
    m = np.array([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.3], [-0.5, -0.9, 1.0]])
    orders = np.array([[2, 0, 1], [0, 2, 1], [1, 2, 0]])
    want = np.zeros(3)
    for i in range(3):
        g = m[i].copy()
        for j in orders[i]:
            if j != i and g @ m[j] < 0:
                g = g - (g @ m[j]) / (m[j] @ m[j]) * m[j]
        want += g
    c = jit_pcgrad_coefficients(jnp.asarray(gram64(m), jnp.float32), jnp.asarray(orders))
    np.testing.assert_allclose(np.asarray(c).sum(0) @ m, want, atol=1e-5)


def test_pcgrad_without_conflict_is_sum():
    m = pad([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.1, 0.0, 1.0]])
    np.testing.assert_allclose(agg("pcgrad", m)[0], m.sum(0), atol=1e-6)


# ----------------------------------------------------------------- MGDA


def min_norm_slsqp(m):
    g = gram64(m)
    t = len(g)
    res = optimize.minimize(lambda x: x @ g @ x, np.full(t, 1.0 / t), jac=lambda x: 2 * g @ x,
                            bounds=[(0, 1)] * t, method="SLSQP",
                            constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
                            options={"ftol": 1e-15, "maxiter": 1000})
    return res.x @ m


@pytest.mark.parametrize("solver", ["auto", "fista"])  # auto = exact for T <= 8
@pytest.mark.parametrize("t,conflict", [(3, False), (5, True)])
def test_mgda_is_min_norm_point(t, conflict, solver):
    m = random_tasks(t, conflict=conflict, seed=t)
    out, _ = agg("mgda", m, solver=solver)
    want = min_norm_slsqp(m)
    np.testing.assert_allclose(out, want, atol=2e-4 * np.abs(m).max())


def test_mgda_two_task_closed_form_and_rescale():
    # lam* = clip((g2 - g1).g2 / |g1 - g2|^2, 0, 1): g1 = (1, 0), g2 = (0, 2):
    # lam = 4/5, d = (0.8, 0.4).
    m = pad([[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(agg("mgda", m)[0], pad([0.8, 0.4]), atol=1e-6)
    np.testing.assert_allclose(agg("mgda", m, rescale=True)[0], pad([1.6, 0.8]), atol=1e-6)
    # One gradient inside the other's "shadow": the min-norm point is the smaller one.
    m = pad([[1.0, 0.0], [3.0, 0.1]])
    np.testing.assert_allclose(agg("mgda", m)[0], pad([1.0, 0.0]), atol=1e-6)


# ----------------------------------------------------------------- CAGrad


def test_cagrad_c0_is_mean():
    m = random_tasks(3, conflict=True, seed=3)
    # (rescale divides by 1 + c^2 = 1 here.)
    np.testing.assert_allclose(agg("cagrad", m, c=0.0)[0], m.mean(0), atol=1e-5)


def test_cagrad_matches_slsqp_dual_and_improves_worst_task():
    c = 0.5
    m = random_tasks(3, conflict=True, seed=7)
    g = gram64(m)
    a = np.full(3, 1.0 / 3)
    g0n = np.sqrt(a @ g @ a)
    best = None
    for x0 in np.random.default_rng(0).dirichlet(np.ones(3), size=6):
        r = optimize.minimize(lambda w: w @ g @ a + c * g0n * np.sqrt(w @ g @ w), x0,
                              bounds=[(0, 1)] * 3, method="SLSQP",
                              constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
                              options={"ftol": 1e-15, "maxiter": 1000})
        best = r if best is None or r.fun < best.fun else best
    gw = best.x @ m
    want = m.mean(0) + c * g0n / np.linalg.norm(gw) * gw
    out0, _ = agg("cagrad", m, c=c, rescale=0)
    np.testing.assert_allclose(out0, want, atol=2e-3 * np.abs(want).max())
    np.testing.assert_allclose(agg("cagrad", m, c=c)[0], want / (1 + c**2),
                               atol=2e-3 * np.abs(want).max())
    # d maximises the worst inner product in the ball around g0, which contains g0.
    assert (m @ out0).min() >= (m @ m.mean(0)).min() - 1e-5
    assert np.linalg.norm(out0 - m.mean(0)) <= c * g0n * (1 + 1e-4)


# ----------------------------------------------------------------- IMTL-G


def test_imtl_g_hand_example():
    # u1 = (1,0), u2 = (0,1); equal projections and a1 + a2 = 1: a = (2/3, 1/3).
    m = pad([[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(agg("imtl_g", m)[0], pad([2 / 3, 2 / 3]), atol=1e-6)


@pytest.mark.parametrize("t", [3, 4])
def test_imtl_g_equal_projections_on_unit_gradients(t):
    m = random_tasks(t, conflict=True, seed=t)
    out, _ = agg("imtl_g", m)
    proj = (m / np.linalg.norm(m, axis=1, keepdims=True)) @ out
    np.testing.assert_allclose(proj, np.full(t, proj.mean()), atol=1e-4 * np.abs(proj).max())
    np.testing.assert_allclose(weights_of(out, m).sum(), 1.0, atol=1e-4)


# ----------------------------------------------------------------- UPGrad


def upgrad_nnls(m):
    # Projection of g_i onto {x: Jx >= 0} is g_i + J^T mu, mu = argmin_{mu>=0} |J^T mu + g_i|.
    out = np.zeros(m.shape[1])
    for gi in m:
        mu, _ = optimize.nnls(m.T, -gi)
        out += gi + mu @ m
    return out / len(m)


@pytest.mark.parametrize("t,conflict", [(2, True), (3, False), (5, True)])
def test_upgrad_nonconflicting_and_matches_nnls(t, conflict):
    m = random_tasks(t, conflict=conflict, seed=10 + t)
    out, _ = agg("upgrad", m)
    scale = np.abs(m).max()
    assert (m @ out).min() >= -1e-5 * scale**2
    np.testing.assert_allclose(out, upgrad_nnls(m), atol=1e-4 * scale)


def test_upgrad_without_conflict_is_mean():
    m = pad([[1.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.1, 0.0, 1.0]])
    np.testing.assert_allclose(agg("upgrad", m)[0], m.mean(0), atol=1e-6)


# ----------------------------------------------------------------- Aligned-MTL


def test_aligned_mtl_orthogonal_equal_norms():
    m = random_tasks(4, conflict=True, seed=5)
    g = jnp.asarray(gram64(m), jnp.float32)
    b = np.asarray(jax.jit(A.aligned_mtl_basis)(g), np.float64)
    aligned = b @ m
    lam_min = np.linalg.eigvalsh(gram64(m))[0]
    np.testing.assert_allclose(aligned @ aligned.T, lam_min * np.eye(4),
                               atol=2e-3 * np.abs(gram64(m)).max())
    np.testing.assert_allclose(agg("aligned_mtl", m)[0], aligned.sum(0), atol=1e-4)


def test_aligned_mtl_hand_example():
    # Orthogonal g1 (norm 1), g2 (norm 2): lam = (1, 4), lam_min = 1, B = diag(1, 1/2):
    # sum of aligned = g1 + g2/2 = (1, 1). "median"/"rmse" of (1, 4): 2.5 -> sqrt(2.5).
    m = pad([[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(agg("aligned_mtl", m)[0], pad([1.0, 1.0]), atol=1e-6)
    r = np.sqrt(2.5)
    np.testing.assert_allclose(agg("aligned_mtl", m, scale="rmse")[0], pad([r, r]), atol=1e-5)
    np.testing.assert_allclose(agg("aligned_mtl", m, scale="median")[0], pad([r, r]), atol=1e-5)


# ----------------------------------------------------------------- Nash-MTL


@pytest.mark.parametrize("t,conflict", [(3, True), (5, False), (4, True)])
def test_nash_mtl_solves_bargaining_equation(t, conflict):
    m = random_tasks(t, conflict=conflict, seed=20 + t)
    g = gram64(m)
    gn = g / np.linalg.norm(g)
    alpha = weights_of(agg("nash_mtl", m)[0], m)
    assert (alpha > 0).all()
    np.testing.assert_allclose(alpha * (gn @ alpha), np.ones(t), atol=2e-3)


def test_nash_mtl_orthogonal_hand_example():
    # G = diag(1, 4), |G|_F = sqrt(17): alpha_i = 1/sqrt(Gn_ii) = 17^(1/4) / (1, 2).
    m = pad([[1.0, 0.0], [0.0, 2.0]])
    s = 17**0.25
    np.testing.assert_allclose(agg("nash_mtl", m)[0], pad([s, s]), rtol=1e-5)


# ----------------------------------------------------------------- GradVac


def test_gradvac_raises_cosine_to_target_with_beta_one():
    m = np.array([[1.0, 0.0], [-0.5, np.sqrt(0.75)]])  # cos = -0.5
    targets = jnp.full((2, 2), 0.5, jnp.float32)
    c, new_t = jit_gradvac_coefficients(jnp.asarray(gram64(m), jnp.float32), targets,
                                        jnp.array([[0, 1], [1, 0]]), beta=1.0)
    adjusted = np.asarray(c) @ m
    for i, j in [(0, 1), (1, 0)]:
        cos = adjusted[i] @ m[j] / (np.linalg.norm(adjusted[i]) * np.linalg.norm(m[j]))
        np.testing.assert_allclose(cos, 0.5, atol=1e-5)
    # beta = 1: the new target is the observed cosine.
    np.testing.assert_allclose(np.asarray(new_t)[[0, 1], [1, 0]], [-0.5, -0.5], atol=1e-6)


def test_gradvac_first_step_is_pcgrad_and_ema():
    # Targets start at 0: the adjustment is then exactly PCGrad's projection.
    m = random_tasks(2, conflict=True, seed=3)
    tx = A.gradvac(num_tasks=2, beta=0.01)
    out, state = jax.jit(tx.update)(jnp.asarray(m, jnp.float32), tx.init(None))
    np.testing.assert_allclose(np.asarray(out), agg("pcgrad", m)[0], rtol=1e-5, atol=1e-5)
    cos = m[0] @ m[1] / np.linalg.norm(m[0]) / np.linalg.norm(m[1])
    np.testing.assert_allclose(np.asarray(state.targets), [[0, 0.01 * cos], [0.01 * cos, 0]],
                               atol=1e-6)


def test_gradvac_needs_num_tasks():
    with pytest.raises(TypeError):
        A.gradvac()  # num_tasks is a required keyword
    with pytest.raises(ValueError, match="num_tasks"):
        make_aggregator("gradvac", num_tasks=None).init(None)


# ----------------------------------------------------------------- GradDrop


def test_graddrop_picks_one_sign_per_coordinate_and_is_deterministic():
    m = random_tasks(2, 4000, seed=4)
    gd = A.aggregate_fn("graddrop")
    out, s1 = gd.apply(jnp.asarray(m, jnp.float32), A.KeyState(jax.random.PRNGKey(3)))
    out = np.asarray(out, np.float64)
    pos = np.where(m > 0, m, 0).sum(0)
    neg = np.where(m < 0, m, 0).sum(0)
    is_pos = np.isclose(out, pos, rtol=1e-6, atol=1e-6)
    is_neg = np.isclose(out, neg, rtol=1e-6, atol=1e-6)
    assert np.all(is_pos | is_neg)
    mixed = (m > 0).any(0) & (m < 0).any(0)
    assert is_pos[mixed].any() and is_neg[mixed].any()
    # Same key -> same draw and same next key; another key -> another draw.
    again, s2 = gd.apply(jnp.asarray(m, jnp.float32), A.KeyState(jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(out, np.asarray(again, np.float64))
    np.testing.assert_array_equal(np.asarray(s1.key), np.asarray(s2.key))
    other, _ = gd.apply(jnp.asarray(m, jnp.float32), A.KeyState(jax.random.PRNGKey(4)))
    assert not np.array_equal(out, np.asarray(other, np.float64))
    # leak = 1 keeps everything.
    np.testing.assert_allclose(agg("graddrop", m, leak=1.0)[0], m.sum(0), atol=1e-5)


def test_graddrop_sign_frequency_follows_purity():
    # g1 = 3, g2 = -1 everywhere: P = 1/2 (1 + 2/4) = 0.75 -> keep +3 w.p. 0.75
    # (4000 draws: standard deviation 0.007).
    m = np.stack([np.full(4000, 3.0), np.full(4000, -1.0)])
    out, _ = agg("graddrop", m)
    assert set(np.unique(out)) <= {3.0, -1.0}
    assert abs((out == 3.0).mean() - 0.75) < 0.03
    # Coordinates where all tasks agree in sign pass through as the plain sum.
    m = pad([[1.0, -2.0, 0.0], [0.5, -1.0, 0.0]])
    np.testing.assert_allclose(agg("graddrop", m)[0], pad([1.5, -3.0, 0.0]))


# ----------------------------------------------------------------- all aggregators


def nested_params():
    # 12 parameters in all (= P): the matrix path reuses the other tests' compilations.
    return {"dense": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros((2,))},
            "emb": [jnp.zeros((4,)), jnp.zeros((1, 2, 1))]}


def per_task_tree(t, seed):
    params = nested_params()
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(rng.normal(size=(t,) + x.shape), jnp.float32) for x in leaves]
    # Make tasks 0 and 1 conflict so the surgery methods do something.
    flat = [x.reshape(t, -1) for x in new]
    new = [jnp.concatenate([f[:1], -0.7 * f[:1] + 0.3 * f[1:2], f[2:]]).reshape(x.shape)
           for f, x in zip(flat, new)]
    return params, jax.tree.unflatten(treedef, new)


@pytest.mark.parametrize("name", ALL)
def test_chain_on_nested_pytree_jit_deterministic_and_equal_to_ravelled(name):
    t = 3
    params, grads = per_task_tree(t, seed=0)
    tx = optax.chain(make_aggregator(name, num_tasks=t), optax.sgd(0.1))

    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    p1, s1 = step(params, tx.init(params), grads)
    p1b, _ = step(params, tx.init(params), grads)  # same seed -> same result
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p1b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(p1) == jax.tree.structure(params)
    # The pytree path equals the matrix path on each task's ravelled gradient.
    mat = jnp.stack([ravel_pytree(jax.tree.map(lambda x: x[i], grads))[0] for i in range(t)])
    agg_state = A.aggregate_fn(name).init(t)
    want, _ = A.aggregate_fn(name).apply(mat, agg_state)
    got = ravel_pytree(p1)[0] / -0.1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)
    # Random methods start from PRNGKey(seed) and split it at every step.
    if hasattr(s1[0], "key"):
        assert not np.array_equal(np.asarray(s1[0].key), np.asarray(jax.random.PRNGKey(0)))
        np.testing.assert_array_equal(np.asarray(tx.init(params)[0].key),
                                      np.asarray(jax.random.PRNGKey(0)))
    # A second step runs with the advanced state (keys split, EMA moved).
    p2, s2 = step(p1, s1, grads)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(p2))


def test_gram_and_combine_keep_dtype_and_match_ravel():
    _, grads = per_task_tree(2, seed=1)
    grads = {"a": grads, "b": jnp.ones((2, 3), jnp.bfloat16)}
    mat = jnp.stack([ravel_pytree(jax.tree.map(lambda x: x[i].astype(jnp.float32), grads))[0]
                     for i in range(2)])
    np.testing.assert_allclose(np.asarray(jax.jit(A.tree_gram)(grads)),
                               np.asarray(mat @ mat.T), rtol=1e-5)
    out = jax.jit(A.tree_combine)(jnp.array([0.5, 0.5]), grads)
    assert out["b"].dtype == jnp.bfloat16 and out["b"].shape == (3,)


def test_registry_errors_and_bad_inputs():
    with pytest.raises(KeyError, match="known aggregators: .*pcgrad"):
        make_aggregator("pc_grad")
    with pytest.raises(TypeError, match="does not take"):
        make_aggregator("mgda", c=0.5)
    with pytest.raises(ValueError, match="same leading task axis"):
        A.sum_tasks().update({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))}, A.EmptyAggState())
    with pytest.raises(ValueError, match="built for 3 tasks"):
        A.mean_tasks(num_tasks=3).update(jnp.ones((2, 3)), A.EmptyAggState())
    assert set(AGGREGATORS) == {"sum", "mean", "pcgrad", "mgda", "cagrad", "imtl_g", "gradvac",
                                "aligned_mtl", "nash_mtl", "upgrad", "graddrop"}


def test_project_simplex():
    proj = jax.jit(A.project_simplex)
    for v in [np.array([0.3, 0.9, -1.0, 0.2]), np.array([5.0, 5.0, 0.0, -1.0]),
              np.array([0.1, 0.2, 0.3, 0.4])]:
        got = np.asarray(proj(jnp.asarray(v, jnp.float32)))
        # Brute force: minimise |x - v| over the simplex with SLSQP.
        r = optimize.minimize(lambda x: ((x - v) ** 2).sum(), np.full(len(v), 1 / len(v)),
                              bounds=[(0, 1)] * len(v), method="SLSQP",
                              constraints={"type": "eq", "fun": lambda x: x.sum() - 1},
                              options={"ftol": 1e-14})
        np.testing.assert_allclose(got, r.x, atol=1e-5)


def test_subset_masks_cover_all_supports():
    masks = A._subset_masks(3, include_empty=False)
    assert {tuple(r) for r in masks} == set(itertools.product([0.0, 1.0], repeat=3)) - {(0, 0, 0)}


@pytest.mark.parametrize("name,scale", [("sum", 1), ("mean", 2 / 3), ("pcgrad", 1), ("mgda", 1),
                                        ("imtl_g", 1), ("aligned_mtl", 1), ("nash_mtl", 1),
                                        ("upgrad", 2 / 3), ("graddrop", 1)])
def test_task_switched_off_is_ignored(name, scale):
    # A schedule's task mask zeroes a task's gradient: the result is that of the other
    # tasks (times 2/3 where the method averages over all T).
    m = random_tasks(2, conflict=True, seed=8)
    with_zero = np.concatenate([m, np.zeros((1, P))])
    got, _ = agg(name, with_zero)
    want, _ = agg(name, m)
    np.testing.assert_allclose(got, scale * want, rtol=2e-4, atol=2e-5)
