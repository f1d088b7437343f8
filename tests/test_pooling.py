"""Additive pooling where the original overflows (SPEC §2.6): scores s = tanh(W h + b)·v > 88.

`faithful` must reproduce the reference's non-finite output; `stable` must stay finite,
equal the original wherever that is finite, and equal the mathematical limit where it is
not: the weights concentrate on the maximum-score positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.reference import Attention
from mtjax.models.fusion import (POOL_EPS, AdditivePooling, faithful_pool_weights,
                                 stable_pool_weights)
from tests._support import max_abs_diff

TOL = 1e-5
D, L = 8, 5
V = 20.0      # every v_j: a saturated u (all ones) scores D·V = 160 > 88, exp(160) = inf in float32
GAIN = 10.0   # W = GAIN·I: h ≥ 2 saturates tanh to exactly 1.0 in float32


def _weights():
    """Torch reference and the same weights as Flax params."""
    ref = Attention(D)
    with torch.no_grad():
        ref.linear.weight.copy_(GAIN * torch.eye(D))
        ref.linear.bias.zero_()
        ref.v.fill_(V)
    params = {"v": jnp.full((D,), V, jnp.float32),
              "linear": {"kernel": jnp.asarray(ref.linear.weight.detach().numpy().T), "bias": jnp.zeros(D)}}
    return ref, {"params": params}


def _inputs():
    """Row 0: small values (max score ≈ 38, finite in the original).
    Row 1: near the edge (scores ≈ 80: exp is ~5e34, still finite).
    Row 2: two different positions that both saturate (score 160, a tie): the original overflows.
    Row 3: one saturated position: the original overflows."""
    rng = np.random.default_rng(0)
    h = rng.uniform(-0.25, 0.25, size=(4, L, D)).astype(np.float32)
    h[1, :, :4] = 2.0                                   # 4 saturated coordinates: 4·20 = 80
    h[1, :, 4:] = rng.uniform(0.0, 0.01, size=(L, 4))   # + 4 · 20 · tanh(≤ 0.1) < 8
    h[2, 1] = np.linspace(2.0, 3.0, D)
    h[2, 3] = np.linspace(4.0, 2.0, D)
    h[3, 4] = 2.5
    return h


def _float64_pool(h, mask, ref):
    """The exact function in float64, with the max subtracted (no overflow): the analytic value."""
    h64 = h.astype(np.float64)
    W = ref.linear.weight.detach().double().numpy()
    v = ref.v.detach().double().numpy()
    s = np.tanh(h64 @ W.T) @ v
    m = s.max(axis=1, keepdims=True)
    a = mask * np.exp(s - m) + POOL_EPS * np.exp(-m)  # = (mask·eˢ + ε)·e^(−max)
    w = mask * a / a.sum(axis=1, keepdims=True)
    return s, w, np.einsum("bl,bld->bd", w, h64)


def _run(mode, params, h, mask):
    return np.asarray(AdditivePooling(D, mode=mode).apply(params, jnp.asarray(h), jnp.asarray(mask)))


def test_overflow_faithful_is_nonfinite_like_reference_and_stable_is_the_limit():
    ref, params = _weights()
    h = _inputs()
    mask = np.ones((4, L), np.float32)  # what the original passes
    with torch.no_grad():
        expected = ref(torch.from_numpy(h), torch.from_numpy(mask)).numpy()
    scores, w64, out64 = _float64_pool(h, mask, ref)
    assert scores[0].max() < 88 and 75 < scores[1].max() < 88  # rows 0-1 finite in the original
    assert scores[2].max() > 88 and scores[3].max() > 88       # rows 2-3 overflow

    overflow = np.array([False, False, True, True])
    assert np.isfinite(expected[~overflow]).all()
    assert np.isnan(expected[overflow]).all()  # inf/inf: the research notes' NaN source

    faithful = _run("faithful", params, h, mask)
    np.testing.assert_array_equal(np.isnan(faithful), np.isnan(expected))
    assert max_abs_diff(faithful[~overflow], expected[~overflow]) <= TOL

    stable = _run("stable", params, h, mask)
    assert np.isfinite(stable).all()
    assert max_abs_diff(stable[~overflow], expected[~overflow]) <= TOL
    assert max_abs_diff(stable[~overflow], faithful[~overflow]) <= TOL
    # Overflowing rows: the limit. Row 2 splits its weight evenly over its tied maxima,
    # row 3 puts all of it on its one saturated position.
    assert max_abs_diff(stable, out64) <= TOL
    assert max_abs_diff(stable[2], (h[2, 1] + h[2, 3]) / 2) <= TOL
    assert max_abs_diff(stable[3], h[3, 4]) <= TOL


def test_pool_weight_functions_on_overflowing_scores():
    scores = jnp.array([[1.0, 2.0, 3.0, 0.5],
                        [100.0, 1.0, 100.0, -5.0],    # two overflowing maxima (a tie)
                        [87.0, 86.0, 1.0, 0.0]])      # largest finite exp range
    mask = jnp.ones_like(scores)
    faithful = np.asarray(faithful_pool_weights(scores, mask))
    # Torch, written as the reference `Attention.forward` computes its weights.
    s, m = torch.tensor(np.asarray(scores)), torch.tensor(np.asarray(mask))
    a = m * torch.exp(s) + 1e-10
    torch_w = (m * a / a.sum(dim=1, keepdim=True)).numpy()
    np.testing.assert_array_equal(np.isnan(faithful), np.isnan(torch_w))
    assert np.isnan(faithful[1, [0, 2]]).all() and (faithful[1, [1, 3]] == 0).all()
    finite = np.isfinite(torch_w)
    assert max_abs_diff(faithful[finite], torch_w[finite]) <= TOL

    stable = np.asarray(stable_pool_weights(scores, mask))
    assert np.isfinite(stable).all()
    np.testing.assert_allclose(stable.sum(axis=1), 1.0, atol=1e-6)
    assert max_abs_diff(stable[[0, 2]], faithful[[0, 2]]) <= TOL
    assert max_abs_diff(stable[1], [0.5, 0.0, 0.5, 0.0]) <= TOL


def test_masked_positions_behave_the_same_in_both_modes():
    ref, params = _weights()
    h = _inputs()[:2]  # rows the original computes finitely
    mask = np.ones((3, L), np.float32)
    h = np.concatenate([h, h[:1]])
    mask[0, [1, 3]] = 0.0
    mask[1, 0] = 0.0
    mask[2] = 0.0  # nothing unmasked: both give weight 0 everywhere, output 0
    with torch.no_grad():
        expected = ref(torch.from_numpy(h), torch.from_numpy(mask)).numpy()
    _, w64, out64 = _float64_pool(h, mask, ref)
    faithful, stable = _run("faithful", params, h, mask), _run("stable", params, h, mask)
    assert np.isfinite(expected).all()
    assert max_abs_diff(faithful, expected) <= TOL
    assert max_abs_diff(stable, expected) <= TOL
    assert max_abs_diff(stable, out64) <= TOL
    assert (stable[2] == 0).all() and (faithful[2] == 0).all()

    scores = jnp.asarray(np.random.default_rng(1).normal(size=(3, L)) * 5, jnp.float32)
    wf = np.asarray(faithful_pool_weights(scores, jnp.asarray(mask)))
    ws = np.asarray(stable_pool_weights(scores, jnp.asarray(mask)))
    assert (wf[mask == 0] == 0).all() and (ws[mask == 0] == 0).all()
    assert max_abs_diff(wf, ws) <= TOL


def test_masked_overflowing_position():
    """A masked position with an overflowing score: the original computes 0·inf = NaN; the
    stable form gives it weight 0 (the limit), leaving the other positions' weights."""
    scores = jnp.array([[120.0, 3.0, 1.0, 2.0]])
    mask = jnp.array([[0.0, 1.0, 1.0, 1.0]])
    assert np.isnan(np.asarray(faithful_pool_weights(scores, mask))).all()
    stable = np.asarray(stable_pool_weights(scores, mask))
    expected = np.concatenate([[0.0], np.exp([3.0, 1.0, 2.0]) / np.exp([3.0, 1.0, 2.0]).sum()])
    assert max_abs_diff(stable, expected[None]) <= TOL


def test_stable_gradients_are_finite_where_faithful_are_not():
    _, params = _weights()
    h = jnp.asarray(_inputs())
    mask = np.ones((4, L), np.float32)
    mask[2, 1] = 0.0  # a masked saturated position too
    mask = jnp.asarray(mask)

    def loss(mode):
        return lambda p, x: jnp.sum(AdditivePooling(D, mode=mode).apply(p, x, mask) ** 2)

    g_params, g_h = jax.grad(loss("stable"), argnums=(0, 1))(params, h)
    leaves = jax.tree_util.tree_leaves((g_params, g_h))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert float(jnp.abs(g_h).sum()) > 0
    # The same loss through the original's formula has NaN gradients: the check is not vacuous.
    f_params, f_h = jax.grad(loss("faithful"), argnums=(0, 1))(params, h)
    assert not np.isfinite(np.asarray(f_h)).all()


def test_unknown_mode_is_rejected():
    _, params = _weights()
    with pytest.raises(ValueError, match="pooling mode must be 'faithful' or 'stable'"):
        AdditivePooling(D, mode="exact").apply(params, jnp.zeros((1, L, D)), jnp.ones((1, L)))
