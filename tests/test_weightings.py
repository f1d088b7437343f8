"""Loss weightings: each rule on a hand example, GradNorm on a toy shared layer, and one
generic training loop that drives every weighting through the common interface."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtjax.mtl import weightings as W
from mtjax.mtl.registry import WEIGHTINGS, make_weighting


def test_unweighted_and_predefined():
    u = W.unweighted()
    s = u.init(3)
    np.testing.assert_array_equal(np.asarray(u.weights(s)), [1, 1, 1])
    assert float(u.loss({}, s, jnp.array([1.0, 2.0, 3.0]))) == pytest.approx(6.0)
    p = W.predefined()
    s = p.init(4)
    np.testing.assert_allclose(np.asarray(p.weights(s)), [0.1, 0.4, 0.2, 0.2])
    p = W.predefined((0.5, 2.0))
    s = p.init(2)
    np.testing.assert_allclose(np.asarray(p.weights(s)), [0.5, 2.0])
    assert float(p.loss({}, s, jnp.array([2.0, 1.0]))) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="2 entries for 3 tasks"):
        p.init(3)


def test_naive_learnable_collapses_toward_zero():
    nl = W.naive_learnable()
    s = nl.init(2)
    losses = jnp.array([0.7, 0.2])
    opt = optax.sgd(0.5)
    wp = nl.params(s)
    ost = opt.init(wp)
    history = [np.asarray(wp["w"])]
    for _ in range(4):
        g = jax.grad(nl.loss)(wp, s, losses)
        np.testing.assert_allclose(np.asarray(g["w"]), np.asarray(losses))  # dL/dw_t = L_t
        upd, ost = opt.update(g, ost, wp)
        wp = optax.apply_updates(wp, upd)
        history.append(np.asarray(wp["w"]))
    history = np.array(history)
    assert np.all(np.diff(history, axis=0) < 0)  # every weight falls at every step
    np.testing.assert_allclose(history[-1], 1.0 - 4 * 0.5 * np.asarray(losses), rtol=1e-6)
    s = nl.set_params(s, wp)
    np.testing.assert_allclose(np.asarray(nl.weights(s)), history[-1])
    assert nl.learnable


def test_uncertainty_optimum_is_log_loss():
    un = W.uncertainty()
    s = un.init(3)
    losses = jnp.array([0.5, 2.0, 0.05])
    opt_s = W.uncertainty_optimum(losses)
    np.testing.assert_allclose(np.asarray(opt_s), np.log([0.5, 2.0, 0.05]), rtol=1e-6)
    g = jax.grad(un.loss)({"log_var": opt_s}, s, losses)
    np.testing.assert_allclose(np.asarray(g["log_var"]), 0.0, atol=1e-6)
    # The closed-form gradient equals autodiff anywhere.
    sv = jnp.array([0.3, -1.0, 2.0])
    np.testing.assert_allclose(np.asarray(jax.grad(W.uncertainty_loss)(sv, losses)),
                               np.asarray(W.uncertainty_grad(sv, losses)), rtol=1e-6)
    # Gradient descent from s = 0 reaches log L; weights are exp(-s) = 1/L there.
    wp = un.params(s)
    for _ in range(300):
        wp = jax.tree.map(lambda p, g: p - 0.2 * g, wp, jax.grad(un.loss)(wp, s, losses))
    np.testing.assert_allclose(np.asarray(wp["log_var"]), np.log(np.asarray(losses)), atol=1e-3)
    s = un.set_params(s, wp)
    np.testing.assert_allclose(np.asarray(un.weights(s)), 1 / np.asarray(losses), rtol=1e-2)


def test_gradnorm_loss_gradient_by_hand():
    # w = (1, 1), norms (1, 10): G = (1, 10), mean 5.5; alpha = 0 -> target 5.5 for both.
    # d/dw_t |w_t n_t - 5.5| = sign(G_t - 5.5) n_t = (-1, +10).
    g = W.gradnorm_weight_grad(jnp.ones(2), jnp.array([1.0, 10.0]), jnp.array([1.0, 1.0]),
                               jnp.array([1.0, 1.0]), 0.0)
    np.testing.assert_allclose(np.asarray(g), [-1.0, 10.0])
    # alpha = 1, losses ratio r = (1.5, 0.5): targets 5.5 * (1.5, 0.5) = (8.25, 2.75).
    loss = W.gradnorm_loss(jnp.ones(2), jnp.array([1.0, 10.0]), jnp.array([3.0, 1.0]),
                           jnp.array([2.0, 2.0]), 1.0)
    assert float(loss) == pytest.approx(abs(1 - 8.25) + abs(10 - 2.75))


def _gradnorm_toy(alpha, steps=300, lr=0.01):
    """Two tasks sharing one linear layer Wsh (4 -> 3), pulling it in opposite directions
    from the same distance; task 2's loss is scaled by 10, so at the start its gradient on
    the shared layer is exactly 10x larger. Fresh random batch every step."""
    key = jax.random.PRNGKey(0)
    kw, k1, kx = jax.random.split(key, 3)
    w0 = 0.1 * jax.random.normal(kw, (4, 3))
    b1 = jax.random.normal(k1, (4, 3))
    b2 = 2 * w0 - b1  # b2 - w0 = -(b1 - w0)

    def task_losses(wsh, x):
        l1 = 0.5 * jnp.mean((x @ wsh - x @ b1) ** 2)
        l2 = 10.0 * 0.5 * jnp.mean((x @ wsh - x @ b2) ** 2)
        return jnp.stack([l1, l2])

    gn = W.gradnorm(alpha=alpha, lr=lr)

    def step(carry, kstep):
        wsh, state = carry
        x = jax.random.normal(kstep, (32, 4))
        losses = task_losses(wsh, x)
        ref = jax.jacrev(task_losses)(wsh, x)  # (2, 4, 3): per-task grads of the layer
        weights = gn.weights(state)
        norms = W.ref_grad_norms(ref)
        gw = jax.grad(lambda p: gn.loss({}, state, task_losses(p, x)))(wsh)
        state = gn.update(state, losses=losses, ref_grads=ref)
        return (wsh - 1e-3 * gw, state), (weights, weights * norms, gn.weights(state))

    (_, state), (ws, gws, new_ws) = jax.lax.scan(step, (w0, gn.init(2)),
                                                  jax.random.split(kx, steps))
    return state, np.asarray(ws), np.asarray(gws), np.asarray(new_ws)


def test_gradnorm_equalises_weighted_gradient_norms():
    state, ws, gws, new_ws = _gradnorm_toy(alpha=0.0)
    ratio = gws[:, 1] / gws[:, 0]
    assert ratio[0] == pytest.approx(10.0, rel=1e-4)  # weights 1, 1 at the start
    np.testing.assert_allclose(new_ws.sum(1), 2.0, rtol=1e-5)  # renormalised to T
    assert abs(np.mean(ratio[-50:]) - 1.0) < 0.05
    assert ws[-1, 0] > ws[-1, 1]
    # L(0) was taken from the first step and kept.
    assert int(state.count) == 300 and np.all(np.asarray(state.initial_losses) > 0)


def test_gradnorm_alpha_15_runs_and_keeps_sum():
    _, _, _, new_ws = _gradnorm_toy(alpha=1.5, steps=40, lr=0.05)
    assert np.all(np.isfinite(new_ws)) and np.all(new_ws > 0)
    np.testing.assert_allclose(new_ws.sum(1), 2.0, rtol=1e-5)


def test_gradnorm_requires_ref_grads():
    gn = W.gradnorm()
    with pytest.raises(ValueError, match="ref_grads"):
        gn.update(gn.init(2), losses=jnp.ones(2))


def test_dwa_hand_example():
    d = W.dwa()
    s = d.init(2)
    for losses in ([1.0, 2.0], [3.0, 4.0]):  # epoch 1 average: (2, 3)
        np.testing.assert_array_equal(np.asarray(d.weights(s)), [1, 1])
        s = d.update(s, losses=jnp.array(losses))
    s = d.end_epoch(s)
    s = d.update(s, losses=jnp.array([1.0, 2.7]))  # epoch 2 average: (1, 2.7)
    np.testing.assert_array_equal(np.asarray(d.weights(s)), [1, 1])  # still epoch 2
    s = d.end_epoch(s)
    # Epoch 3: r = (1/2, 2.7/3) = (0.5, 0.9); w = 2 softmax(r / 2).
    r = np.array([0.5, 0.9]) / 2.0
    want = 2 * np.exp(r) / np.exp(r).sum()
    np.testing.assert_allclose(np.asarray(d.weights(s)), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(W.dwa_weights(jnp.array([2.0, 3.0]),
                                                        jnp.array([1.0, 2.7]))), want, rtol=1e-6)
    assert d.per_epoch
    # An epoch without steps changes nothing.
    s2 = d.end_epoch(s)
    np.testing.assert_allclose(np.asarray(d.weights(s2)), want, rtol=1e-6)


def test_rlw_reproducible_and_normalised():
    r = W.rlw()
    s = r.init(4, jax.random.PRNGKey(7))
    w0 = np.asarray(r.weights(s))
    z = jax.random.normal(jax.random.split(jax.random.PRNGKey(7))[1], (4,))
    np.testing.assert_allclose(w0, np.asarray(jax.nn.softmax(z)), rtol=1e-6)
    assert w0.sum() == pytest.approx(1.0, abs=1e-6) and np.all(w0 > 0)
    s1 = r.update(s, losses=jnp.ones(4))
    w1 = np.asarray(r.weights(s1))
    assert not np.allclose(w0, w1) and w1.sum() == pytest.approx(1.0, abs=1e-6)
    s1b = r.update(r.init(4, jax.random.PRNGKey(7)), losses=jnp.ones(4))
    np.testing.assert_array_equal(w1, np.asarray(r.weights(s1b)))
    rt = W.rlw(sum_to_num_tasks=True)
    assert float(jnp.sum(rt.weights(rt.init(4)))) == pytest.approx(4.0, rel=1e-6)


def test_famo_moves_weight_to_slowest_task():
    f = W.famo()
    s = f.init(3)
    np.testing.assert_allclose(np.asarray(f.weights(s)), [1 / 3] * 3, rtol=1e-6)
    losses = jnp.array([1.0, 1.0, 1.0])
    new_losses = jnp.array([0.5, 0.9, 0.99])  # task 3 decreases slowest
    zs = []
    for _ in range(5):
        s = f.update(s, losses=losses, new_losses=new_losses)
        zs.append(np.asarray(jax.nn.softmax(s.logits)))
    zs = np.array(zs)
    assert np.all(np.diff(zs[:, 2]) > 0) and np.all(np.diff(zs[:, 0]) < 0)
    assert zs[-1, 2] > zs[-1, 1] > zs[-1, 0]
    # Loss weights c z_t / L_t: sum to 1, and sum_t w_t grad L_t = c sum_t z_t grad log L_t.
    l = jnp.array([2.0, 0.5, 1.0])
    w = np.asarray(f.weights(s, l))
    z = zs[-1]
    np.testing.assert_allclose(w, (z / l) / np.sum(z / l), rtol=1e-5)
    assert w.sum() == pytest.approx(1.0, abs=1e-6)


def test_famo_sgd_update_by_hand():
    f = W.famo(optimizer="sgd", lr=0.1, gamma=1e-3)
    s = f.init(2)
    losses, new_losses = jnp.array([1.0, 2.0]), jnp.array([0.5, 1.9])
    s = f.update(s, losses=losses, new_losses=new_losses)
    delta = np.log([1.0, 2.0]) - np.log([0.5, 1.9])
    z = np.array([0.5, 0.5])
    grad = z * (delta - z @ delta)  # + gamma * xi, xi = 0 at the start
    np.testing.assert_allclose(np.asarray(s.logits), -0.1 * grad, rtol=1e-5)
    with pytest.raises(ValueError, match="new_losses"):
        f.update(s, losses=losses)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_generic_loop_drives_every_weighting(name):
    """One jitted loop, no per-method branches beyond the flags."""
    t = 4
    wt = make_weighting(name)
    a = jnp.asarray(np.random.default_rng(0).normal(size=(t, 5)), jnp.float32)
    b = jnp.asarray([1.0, -1.0, 0.5, 2.0])

    def task_losses(theta):
        return 0.5 * (a @ theta - b) ** 2 + 0.1

    opt = optax.sgd(0.05)

    @jax.jit
    def step(params, opt_state, wstate):
        def objective(params):
            losses = task_losses(params["model"])
            return wt.loss(params["w"], wstate, losses), losses

        (_, losses), grads = jax.value_and_grad(objective, has_aux=True)(params)
        if not wt.learnable:  # model gradient is exactly sum_t w_t grad L_t
            jac = jax.jacrev(task_losses)(params["model"])
            want = wt.weights(wstate, losses) @ jac
            grads_ok = jnp.allclose(grads["model"], want, rtol=1e-4, atol=1e-6)
        else:
            grads_ok = jnp.array(True)
        updates, opt_state = opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        wstate = wt.set_params(wstate, new_params["w"])
        kw = {}
        if wt.needs_ref_grads:
            kw["ref_grads"] = jax.jacrev(task_losses)(params["model"])
        if wt.needs_new_losses:
            kw["new_losses"] = task_losses(new_params["model"])
        wstate = wt.update(wstate, losses=losses, **kw)
        return new_params, opt_state, wstate, losses, grads_ok

    wstate = wt.init(t, jax.random.PRNGKey(1))
    params = {"model": jnp.zeros(5), "w": wt.params(wstate)}
    opt_state = opt.init(params)
    first = None
    for i in range(30):
        params, opt_state, wstate, losses, grads_ok = step(params, opt_state, wstate)
        assert bool(grads_ok)
        first = losses if first is None else first
        if i % 5 == 4:
            wstate = wt.end_epoch(wstate)
    w = wt.weights(wstate, losses)
    assert w.shape == (t,) and bool(jnp.all(jnp.isfinite(w)))
    if name != "naive_learnable":  # the degenerate baseline may switch losses off
        assert float(jnp.sum(losses)) < float(jnp.sum(first))


def test_registry_errors():
    with pytest.raises(KeyError, match="known weightings: .*gradnorm"):
        make_weighting("grad_norm")
    with pytest.raises(TypeError, match="does not take"):
        make_weighting("dwa", alpha=1.5)
    assert set(WEIGHTINGS) == {"unweighted", "predefined", "naive_learnable", "uncertainty",
                               "gradnorm", "dwa", "rlw", "famo"}
    assert make_weighting("gradnorm", alpha=0.5).needs_ref_grads
    assert make_weighting("famo").needs_new_losses
    assert make_weighting("dwa").per_epoch
    assert make_weighting("uncertainty").learnable
