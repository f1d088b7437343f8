"""Multi-task gradient aggregators as optax ``GradientTransformation``s.

Input and output
----------------
``update(updates, state, params=None)`` takes a *per-task gradient pytree*: every
leaf has a leading axis ``T`` (tasks, in ``config.tasks`` order), the rest of the
leaf shaped like the parameter. It returns one update pytree shaped like the
parameters (leading axis removed), so an aggregator goes first in a chain::

    tx = optax.chain(pcgrad(seed=0), optax.adam(1e-4))
    opt_state = tx.init(params)                       # params without the T axis
    per_task = jax.jacrev(task_losses)(params, batch)  # leaves (T, ...)
    updates, opt_state = tx.update(per_task, opt_state, params)

Geometry
--------
Every method except ``sum``/``mean``/``graddrop`` is a linear combination
``d = sum_i w_i g_i`` whose weights ``w`` depend on the task gradients only through
their Gram matrix ``G_ij = <g_i, g_j>`` of the *whole-model* flattened vectors.
``G`` of the concatenated vector (what ``jax.flatten_util.ravel_pytree`` per task
would give) equals the sum over leaves of the per-leaf Gram matrices, so we compute
it leaf by leaf (``tree_gram``) and never materialise the (T, P) concatenation --
that copy would cost T x the model size in memory. ``tree_combine`` then forms
``sum_i w_i g_i`` per leaf. The Gram matrix and the combination are computed in
float32 (or wider) at HIGHEST matmul precision, whatever the leaf dtype.

The pure solvers ``*_weights(gram, ...)`` map a (T, T) Gram matrix to the (T,)
combination weights; they are public so their math can be tested and reused.
``aggregate_fn(name, **opts)`` gives the same aggregators on a plain (T, P) matrix
(a matrix is a one-leaf per-task pytree, so it runs exactly the same code).

Randomness (PCGrad's orders, GradVac's orders, GradDrop's sampling) comes from a
PRNG key kept in the state and split at every step: results are deterministic given
``seed``. Solvers use fixed iteration counts, so everything is ``jit``-safe.

``num_tasks``: every constructor accepts it so a training loop can pass it
uniformly; only GradVac needs it (its state holds a T x T matrix of targets). When
given, ``update`` checks the leading axis against it.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST

__all__ = [
    # transforms
    "sum_tasks", "mean_tasks", "pcgrad", "mgda", "cagrad", "imtl_g", "gradvac",
    "aligned_mtl", "nash_mtl", "upgrad", "graddrop",
    # states
    "EmptyAggState", "KeyState", "GradVacState",
    # pure pieces
    "tree_gram", "tree_combine", "project_simplex", "pcgrad_coefficients", "pcgrad_weights",
    "mgda_weights", "gradvac_coefficients", "random_orders", "MAX_EXACT_TASKS",
    "cagrad_weights", "imtl_g_weights", "gradvac_weights", "aligned_mtl_basis",
    "aligned_mtl_weights", "nash_mtl_weights", "upgrad_weights", "graddrop_combine",
    "MatrixAggregator", "aggregate_fn",
]


# --------------------------------------------------------------------------- #
# Pytree helpers
# --------------------------------------------------------------------------- #


def _compute_dtype(dtype) -> jnp.dtype:
    # At least float32 for the geometry, float64 if the caller enabled x64.
    return jnp.promote_types(dtype, jnp.float32)


def _num_tasks(per_task: Any) -> int:
    leaves = jax.tree.leaves(per_task)
    if not leaves:
        raise ValueError("aggregator: the per-task gradient pytree has no leaves")
    sizes = {int(jnp.shape(x)[0]) if jnp.ndim(x) else -1 for x in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            "aggregator: every leaf needs the same leading task axis T; got leading sizes "
            f"{sorted(sizes)}"
        )
    return sizes.pop()


def tree_gram(per_task: Any) -> Array:
    """(T, T) Gram matrix of the per-task gradients flattened over the whole pytree.

    Equal to ``M @ M.T`` with ``M[t] = ravel_pytree(task t's gradient)``, computed as
    a sum of per-leaf Gram matrices (no (T, P) concatenation).
    """
    t = _num_tasks(per_task)
    leaves = jax.tree.leaves(per_task)
    dtype = functools.reduce(jnp.promote_types, [_compute_dtype(x.dtype) for x in leaves])
    gram = jnp.zeros((t, t), dtype)
    for leaf in leaves:
        m = jnp.reshape(leaf, (t, -1)).astype(dtype)
        gram = gram + jnp.matmul(m, m.T, precision=_HI)
    return gram


def tree_combine(weights: Array, per_task: Any) -> Any:
    """``sum_i weights[i] * g_i`` leaf by leaf; each output leaf keeps its input dtype."""

    def comb(leaf):
        dtype = _compute_dtype(leaf.dtype)
        out = jnp.tensordot(weights.astype(dtype), leaf.astype(dtype), axes=1, precision=_HI)
        return out.astype(leaf.dtype)

    return jax.tree.map(comb, per_task)


def _normalise_gram(gram: Array) -> Array:
    # The weights of MGDA, CAGrad, UPGrad are invariant to a global rescaling of G;
    # dividing by the mean squared norm keeps the solvers' numbers O(1).
    t = gram.shape[0]
    scale = jnp.trace(gram) / t
    tiny = jnp.finfo(gram.dtype).tiny
    return gram / jnp.where(scale > tiny, scale, 1.0)


# --------------------------------------------------------------------------- #
# Small solvers
# --------------------------------------------------------------------------- #


def project_simplex(v: Array) -> Array:
    """Euclidean projection of ``v`` (last axis) onto the probability simplex.

    Sort-based rule (Held, Wolfe, Crowder 1974; Duchi et al. 2008): with ``u`` sorted
    decreasingly, ``rho = max{k : u_k - (sum_{j<=k} u_j - 1)/k > 0}``,
    ``theta = (sum_{j<=rho} u_j - 1)/rho``, result ``max(v - theta, 0)``.
    """
    n = v.shape[-1]
    u = -jnp.sort(-v, axis=-1)
    css = jnp.cumsum(u, axis=-1)
    k = jnp.arange(1, n + 1, dtype=v.dtype)
    cond = u - (css - 1.0) / k > 0
    rho = jnp.max(jnp.where(cond, jnp.arange(1, n + 1), 0), axis=-1, keepdims=True)
    css_rho = jnp.take_along_axis(css, rho - 1, axis=-1)
    theta = (css_rho - 1.0) / rho.astype(v.dtype)
    return jnp.maximum(v - theta, 0.0)


def _fista_qp(q: Array, b: Array, project: Callable[[Array], Array], x0: Array,
              num_iters: int) -> Array:
    """min_x 1/2 x^T Q x + b^T x over a convex set, by FISTA with adaptive restart.

    ``x`` may carry leading batch axes (several independent problems sharing ``Q``).
    Step 1/L with L = largest eigenvalue of Q (the exact Lipschitz constant of the
    gradient). Momentum is reset per problem when it stops helping (O'Donoghue and
    Candes 2015 gradient restart), which keeps the convergence linear on these small,
    often ill-conditioned problems.
    """
    lmax = jnp.linalg.eigvalsh(q)[-1]
    step = 1.0 / jnp.maximum(lmax, jnp.finfo(q.dtype).tiny)

    def body(_, carry):
        x, y, t = carry
        grad = jnp.matmul(y, q, precision=_HI) + b  # Q symmetric
        x_new = project(y - step * grad)
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        restart = jnp.sum((y - x_new) * (x_new - x), axis=-1, keepdims=True) > 0
        beta = jnp.where(restart, 0.0, (t - 1.0) / t_new)
        t_new = jnp.where(restart, 1.0, t_new)
        return x_new, x_new + beta * (x_new - x), t_new

    t0 = jnp.ones(x0.shape[:-1] + (1,), x0.dtype)
    x, _, _ = jax.lax.fori_loop(0, num_iters, body, (x0, x0, t0))
    return x


def random_orders(key: Array, t: int) -> Array:
    """(T, T) int: row i is an independent random permutation of range(T)."""
    return jax.vmap(lambda k: jax.random.permutation(k, t))(jax.random.split(key, t))


# --------------------------------------------------------------------------- #
# Weight solvers: Gram matrix -> combination weights
# --------------------------------------------------------------------------- #


def pcgrad_coefficients(gram: Array, orders: Array) -> Array:
    """PCGrad's projected gradients as a (T, T) matrix C: ``g_i' = sum_k C[i, k] g_k``.

    ``orders[i]`` is the order in which task i visits the tasks (itself is skipped).
    Keeping ``g_i'`` as coefficients over the original gradients means every dot
    product comes from the Gram matrix.
    """
    t = gram.shape[0]
    eye = jnp.eye(t, dtype=gram.dtype)

    def per_task(i, order):
        def visit(c, j):
            dot = jnp.dot(c, gram[:, j], precision=_HI)  # <g_i', g_j>
            nj2 = gram[j, j]
            do = (j != i) & (dot < 0) & (nj2 > 0)
            coef = jnp.where(do, dot / jnp.where(nj2 > 0, nj2, 1.0), 0.0)
            return c - coef * eye[j], None

        c, _ = jax.lax.scan(visit, eye[i], order)
        return c

    return jax.vmap(per_task)(jnp.arange(t), orders)


def pcgrad_weights(gram: Array, key: Array) -> Array:
    """PCGrad weights (``sum_i g_i'``) with a fresh random order per task from ``key``."""
    return jnp.sum(pcgrad_coefficients(gram, random_orders(key, gram.shape[0])), axis=0)


def _subset_masks(t: int, include_empty: bool) -> np.ndarray:
    """All subsets of range(t) as a (K, t) 0/1 float array (static, built with numpy)."""
    bits = (np.arange(2**t)[:, None] >> np.arange(t)[None, :]) & 1
    return bits[0 if include_empty else 1:].astype(np.float32)


# Up to this many tasks the small QPs are solved exactly by enumerating supports
# (2^T batched linear solves, one shot); above it by FISTA with a fixed iteration count.
MAX_EXACT_TASKS = 8


def _active(gram: Array) -> Array:
    """Tasks with a non-zero gradient. A task switched off for a step (its loss weight
    0, e.g. by a schedule's task mask) has an exactly zero row; MGDA and IMTL-G solve
    on the other tasks only (a zero vector in MGDA's hull would make the update 0, and
    IMTL-G's unit vector of a zero gradient is undefined)."""
    return jnp.diag(gram) > 0


def _project_simplex_on(v: Array, active: Array) -> Array:
    # Projection onto the face of the simplex spanned by the active coordinates: an
    # entry below theta gets 0, and theta >= max(v_active) - 1, so parking the inactive
    # entries at max(v_active) - 2 zeroes them.
    top = jnp.max(jnp.where(active, v, -jnp.inf))
    low = jnp.where(jnp.isfinite(top), top - 2.0, 0.0)
    return jnp.where(active, project_simplex(jnp.where(active, v, low)), 0.0)


def _mgda_exact(gram: Array, active: Array) -> Array:
    # For each support S solve the KKT system of min lam^T G lam s.t. sum lam = 1,
    # lam = 0 off S; project the result onto the simplex (so every candidate is
    # feasible) and keep the best. The optimum's own support yields it exactly, and
    # no feasible point beats it, so the argmin is the optimum. Supports containing
    # an inactive task are excluded.
    t = gram.shape[0]
    dtype = gram.dtype
    masks = jnp.asarray(_subset_masks(t, include_empty=False), dtype)

    def candidate(m):
        kkt = jnp.zeros((t + 1, t + 1), dtype)
        kkt = kkt.at[:t, :t].set(gram * m[:, None] * m[None, :] + jnp.diag(1.0 - m))
        kkt = kkt.at[:t, t].set(m).at[t, :t].set(m)
        rhs = jnp.zeros((t + 1,), dtype).at[t].set(1.0)
        lam = jnp.linalg.solve(kkt, rhs)[:t] * m
        lam = jnp.where(jnp.all(jnp.isfinite(lam)), lam, m / jnp.sum(m))
        lam = project_simplex(lam)
        allowed = jnp.all((m == 0) | active)
        return lam, jnp.where(allowed, lam @ gram @ lam, jnp.inf)

    lams, vals = jax.vmap(candidate)(masks)
    return lams[jnp.argmin(vals)]


def mgda_weights(gram: Array, num_iters: int = 200, solver: str = "auto") -> Array:
    """Min-norm point of the convex hull: ``argmin_{lam in simplex} lam^T G lam``.

    ``solver="exact"`` (default for T <= MAX_EXACT_TASKS via "auto"): enumerate the
    2^T - 1 possible supports, solve each equality-constrained KKT system, keep the
    best feasible candidate, then polish it with ``num_iters`` FISTA steps (float32
    KKT solves lose accuracy on ill-conditioned supports; FISTA recovers it).
    ``solver="fista"``: FISTA with restart on the (scale-normalised) Gram matrix,
    projecting onto the simplex, ``num_iters`` fixed iterations from the uniform
    point. Since ``||sum lam_i g_i - d*||^2 <= F(lam) - F*`` here, the direction is
    accurate whenever the objective is, even if ``lam`` is not unique.
    Tasks with an exactly zero gradient are left out (weight 0).
    """
    t = gram.shape[0]
    gn = _normalise_gram(gram)
    active = _active(gram)
    n_active = jnp.sum(active)
    uniform = jnp.where(n_active > 0, active / jnp.maximum(n_active, 1), 1.0 / t).astype(gram.dtype)
    x0 = _mgda_exact(gn, active) if _use_exact(solver, t) else uniform
    x = _fista_qp(gn, jnp.zeros((t,), gram.dtype), lambda v: _project_simplex_on(v, active), x0,
                  num_iters)
    return jnp.where(n_active > 0, x, uniform)


def _use_exact(solver: str, t: int) -> bool:
    if solver not in ("auto", "exact", "fista"):
        raise ValueError(f"solver must be 'auto', 'exact' or 'fista', got {solver!r}")
    return solver == "exact" or (solver == "auto" and t <= MAX_EXACT_TASKS)


def cagrad_weights(gram: Array, c: float = 0.5, num_iters: int = 100,
                   rescale: int = 1) -> Array:
    """CAGrad combination weights.

    Dual: ``w* = argmin_{w in simplex} w^T G a + c ||g0|| ||g_w||`` with ``a = 1/T``,
    ``g0 = mean gradient``, ``g_w = sum w_i g_i``. Update
    ``d = g0 + c ||g0|| / ||g_w*|| g_w*``, then divided by ``1 + c^2`` (rescale=1),
    by ``1 + c`` (rescale=2) or not at all (rescale=0).

    Solver: the objective is convex but not smooth where ``g_w -> 0``, so instead of
    a fixed step we run ``num_iters`` projected-gradient steps and, at each, evaluate
    24 step sizes (halving from one that moves any weight by at most 1) in parallel
    and keep the best point (monotone; jit-safe since all candidates are computed).
    """
    if rescale not in (0, 1, 2):
        raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale}")
    t = gram.shape[0]
    dtype = gram.dtype
    gn = _normalise_gram(gram)
    a = jnp.full((t,), 1.0 / t, dtype)
    ga = gn @ a
    g0_norm = jnp.sqrt(jnp.maximum(a @ ga, 0.0))
    k = c * g0_norm
    eps = jnp.asarray(1e-12, dtype)

    def objective(w):
        return w @ ga + k * jnp.sqrt(jnp.maximum(w @ gn @ w, 0.0) + eps)

    def grad(w):
        gw = gn @ w
        return ga + k * gw / jnp.sqrt(jnp.maximum(w @ gw, 0.0) + eps)

    halvings = 2.0 ** -jnp.arange(24, dtype=dtype)

    def body(_, w):
        g = grad(w)
        g = g - jnp.mean(g)  # the simplex's tangent part; the rest is projected away
        s0 = 1.0 / jnp.maximum(jnp.max(jnp.abs(g)), jnp.finfo(dtype).tiny)
        cands = jax.vmap(lambda s: project_simplex(w - s * s0 * g))(halvings)
        vals = jax.vmap(objective)(cands)
        best = jnp.argmin(vals)
        return jnp.where(vals[best] < objective(w), cands[best], w)

    w = jax.lax.fori_loop(0, num_iters, body, a)
    gw_norm = jnp.sqrt(jnp.maximum(w @ gn @ w, 0.0))
    lam = k / jnp.maximum(gw_norm, jnp.sqrt(eps))
    weights = a + lam * w
    if rescale == 1:
        weights = weights / (1.0 + c**2)
    elif rescale == 2:
        weights = weights / (1.0 + c)
    return weights


def imtl_g_weights(gram: Array, eps: float = 1e-12) -> Array:
    """IMTL-G: ``alpha`` with ``sum alpha = 1`` and equal projections on unit gradients.

    Solves ``<sum_j alpha_j g_j, u_r - u_k> = 0`` for every task k != r and
    ``sum alpha = 1``, with ``u_k = g_k/||g_k||`` and r the reference (first) task;
    ``<u_k, g_j> = G_kj/||g_k||`` so this is a T x T linear system on the Gram matrix
    (the paper's closed form ``alpha_{2:T} = g_1 U^T (D U^T)^-1`` solves the same
    equations). Tasks with an exactly zero gradient get ``alpha = 0`` and the first
    task with a non-zero gradient is the reference. Falls back to uniform weights if
    the system is singular (linearly dependent unit differences).
    """
    t = gram.shape[0]
    active = _active(gram)
    ref = jnp.argmax(active)  # first active task (0 if none)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), eps))
    ug = gram / norms[:, None]  # ug[k, j] = <u_k, g_j>
    idx = jnp.arange(t)
    eye = jnp.eye(t, dtype=gram.dtype)
    rows = jnp.where((idx == ref)[:, None], jnp.ones((t, t), gram.dtype),
                     jnp.where(active[:, None], ug[ref][None, :] - ug, eye))
    rhs = (idx == ref).astype(gram.dtype)
    alpha = jnp.linalg.solve(rows, rhs)
    ok = jnp.all(jnp.isfinite(alpha))
    return jnp.where(ok, alpha, jnp.full((t,), 1.0 / t, gram.dtype))


def gradvac_coefficients(gram: Array, targets: Array, orders: Array,
                         beta: float) -> tuple[Array, Array]:
    """GradVac with explicit orders: (C, new targets) with ``g_i' = sum_k C[i, k] g_k``."""
    t = gram.shape[0]
    eye = jnp.eye(t, dtype=gram.dtype)
    one = jnp.asarray(1.0, gram.dtype)

    def per_task(i, order, target_row):
        def visit(carry, j):
            c, row = carry
            nj = jnp.sqrt(jnp.maximum(gram[j, j], 0.0))
            ni = jnp.sqrt(jnp.maximum(c @ gram @ c, 0.0))
            dot = c @ gram[:, j]
            denom = ni * nj
            phi = jnp.clip(jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, one), 0.0),
                           -1.0, 1.0)
            tgt = row[j]
            s_tgt = jnp.sqrt(jnp.maximum(1.0 - tgt**2, 0.0))
            s_phi = jnp.sqrt(jnp.maximum(1.0 - phi**2, 0.0))
            active = (j != i) & (phi < tgt) & (denom > 0) & (s_tgt > 0)
            coef = ni * (tgt * s_phi - phi * s_tgt) / jnp.where(active, nj * s_tgt, one)
            c = c + jnp.where(active, coef, 0.0) * eye[j]
            row = row.at[j].set(jnp.where(j != i, (1.0 - beta) * tgt + beta * phi, tgt))
            return (c, row), None

        (c, row), _ = jax.lax.scan(visit, (eye[i], target_row), order)
        return c, row

    return jax.vmap(per_task)(jnp.arange(t), orders, targets)


def gradvac_weights(gram: Array, targets: Array, key: Array,
                    beta: float = 0.01) -> tuple[Array, Array]:
    """GradVac weights (``sum_i g_i'``) and updated EMA targets; fresh random order per
    task from ``key``."""
    coeffs, new_targets = gradvac_coefficients(gram, targets, random_orders(key, gram.shape[0]),
                                               beta)
    return jnp.sum(coeffs, axis=0), new_targets


def aligned_mtl_basis(gram: Array, scale: str = "min") -> Array:
    """Aligned-MTL's (T, T) matrix ``B``: aligned gradients are ``B @ M``.

    With ``G = V diag(lam) V^T``: ``B = sqrt(lam_ref) V diag(lam^-1/2) V^T``, so
    ``(B M)(B M)^T = lam_ref I``: orthogonal rows of equal norm ``sqrt(lam_ref)``
    (condition number 1). Eigenvalues below ``lam_max * T * eps`` are treated as zero
    (pseudo-inverse, the aligned system then spans the gradients' range only).
    ``scale``: "min" (smallest non-zero eigenvalue, the published default),
    "median" (median non-zero eigenvalue) or "rmse" (mean non-zero eigenvalue, i.e.
    the root mean square singular value).
    """
    t = gram.shape[0]
    lam, vecs = jnp.linalg.eigh(gram)
    tol = jnp.max(lam) * t * jnp.finfo(gram.dtype).eps
    keep = lam > jnp.maximum(tol, jnp.finfo(gram.dtype).tiny)
    inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    if scale == "min":
        ref = jnp.min(jnp.where(keep, lam, jnp.inf))
    elif scale == "median":
        ref = jnp.nanmedian(jnp.where(keep, lam, jnp.nan))
    elif scale == "rmse":
        ref = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(jnp.sum(keep), 1)
    else:
        raise ValueError(f"aligned_mtl: scale must be 'min', 'median' or 'rmse', got {scale!r}")
    ref = jnp.where(jnp.any(keep), ref, 0.0)
    return jnp.sqrt(ref) * jnp.matmul(vecs * inv_sqrt, vecs.T, precision=_HI)


def aligned_mtl_weights(gram: Array, scale: str = "min",
                        task_weights: Optional[Array] = None) -> Array:
    """Weights of ``sum_i w_i ghat_i`` (``ghat = B M``; ``w`` = ones by default)."""
    b = aligned_mtl_basis(gram, scale)
    w = jnp.ones((gram.shape[0],), gram.dtype) if task_weights is None else task_weights
    return b.T @ w


def nash_mtl_weights(gram: Array, num_iters: int = 20, ridge: float = 0.0) -> Array:
    """Nash-MTL bargaining weights: ``alpha > 0`` with ``(Gn alpha)_i = 1/alpha_i``.

    ``Gn = G / ||G||_F`` (the published normalisation) plus ``ridge * I``. The
    equations are the stationarity conditions of the strictly convex, self-concordant
    ``f(alpha) = 1/2 alpha^T Gn alpha - sum_i log alpha_i``, so we run ``num_iters``
    Newton steps, damped by ``1/(1 + lambda)`` (lambda = Newton decrement) while
    ``lambda > 1/4``: the damped step provably stays in ``alpha > 0`` and the pure
    phase converges quadratically. Start: ``alpha ~ 1/||g_i||`` (the exact answer for
    orthogonal gradients), rescaled optimally along that ray.
    The published solver instead runs a few iterations of a sequence of convex
    programs (CCP) with cvxpy; both target the same equation. If 0 lies in the
    gradients' convex cone (Pareto-stationary point) there is no solution and alpha
    grows without bound; ``ridge > 0`` keeps it finite.
    """
    t = gram.shape[0]
    dtype = gram.dtype
    tiny = jnp.finfo(dtype).tiny
    fro = jnp.sqrt(jnp.sum(gram * gram))
    gn = gram / jnp.where(fro > tiny, fro, 1.0) + ridge * jnp.eye(t, dtype=dtype)
    v = 1.0 / jnp.sqrt(jnp.maximum(jnp.diag(gn), 1e-12))
    s = jnp.sqrt(t / jnp.maximum(v @ gn @ v, 1e-12))
    alpha0 = s * v

    def body(_, alpha):
        g = gn @ alpha - 1.0 / alpha
        h = gn + jnp.diag(1.0 / alpha**2)
        delta = -jnp.linalg.solve(h, g)
        dec = jnp.sqrt(jnp.maximum(-g @ delta, 0.0))
        step = jnp.where(dec > 0.25, 1.0 / (1.0 + dec), 1.0)
        new = alpha + step * delta
        ok = jnp.all(jnp.isfinite(new)) & jnp.all(new > 0)
        return jnp.where(ok, new, alpha)

    return jax.lax.fori_loop(0, num_iters, body, alpha0)


def _upgrad_exact(gram: Array) -> Array:
    # Problem i: min_{mu >= 0} 1/2 mu^T G mu + mu^T G e_i (then v_i = e_i + mu). For
    # each support S (the empty one included: g_i already in the cone) solve the
    # unconstrained problem on S, clip to mu >= 0 (feasible) and keep the best: the
    # optimum's support yields it exactly and no feasible point beats it.
    t = gram.shape[0]
    dtype = gram.dtype
    masks = jnp.asarray(_subset_masks(t, include_empty=True), dtype)
    eye = jnp.eye(t, dtype=dtype)

    def solve_one(i):
        b = gram[i]

        def candidate(m):
            a = gram * m[:, None] * m[None, :] + jnp.diag(1.0 - m)
            mu = jnp.linalg.solve(a, -b * m) * m
            mu = jnp.where(jnp.all(jnp.isfinite(mu)), jnp.maximum(mu, 0.0), 0.0)
            return mu, 0.5 * mu @ gram @ mu + mu @ b

        mus, vals = jax.vmap(candidate)(masks)
        return eye[i] + mus[jnp.argmin(vals)]

    return jax.vmap(solve_one)(jnp.arange(t))


def upgrad_weights(gram: Array, num_iters: int = 200, solver: str = "auto",
                   task_weights: Optional[Array] = None) -> Array:
    """UPGrad weights: mean of the projections of each g_i onto the dual cone.

    Projection of ``g_i`` onto ``{x : <g_j, x> >= 0 for all j}`` is ``J^T v_i`` with
    ``v_i = argmin_{v >= e_i} 1/2 v^T G v`` (its dual, a non-negative QP in the T
    multipliers ``v - e_i``). ``solver="exact"`` (default for T <= MAX_EXACT_TASKS
    via "auto") enumerates the 2^T supports per problem (batched linear solves);
    ``solver="fista"`` solves the T problems together by FISTA with restart,
    ``num_iters`` iterations from ``v_i = e_i`` (slow when G is ill-conditioned).
    The result ``sum_i p_i J^T v_i`` uses ``p = 1/T`` (average) unless
    ``task_weights`` is given.
    """
    t = gram.shape[0]
    gn = _normalise_gram(gram)
    eye = jnp.eye(t, dtype=gram.dtype)
    # As for MGDA, the exact answer is polished by FISTA (float32 rounding in
    # ill-conditioned supports); without it FISTA starts from v_i = e_i.
    v0 = _upgrad_exact(gn) if _use_exact(solver, t) else eye
    v = _fista_qp(gn, jnp.zeros((t, t), gram.dtype), lambda x: jnp.maximum(x, eye), v0, num_iters)
    p = jnp.full((t,), 1.0 / t, gram.dtype) if task_weights is None else task_weights
    return p @ v


def graddrop_combine(per_task: Array, uniform: Array, leak: float = 0.0) -> Array:
    """GradDrop on one array: per_task (T, ...), uniform (...) in [0, 1).

    ``P = 1/2 (1 + sum_i g_i / sum_i |g_i|)`` per coordinate; keep the positive
    components where ``P > U`` and the negative ones where ``U > P``:
    ``M_i = 1[P > U] 1[g_i > 0] + 1[U > P] 1[g_i < 0]``; output
    ``sum_i (leak + (1 - leak) M_i) g_i``.
    """
    dtype = _compute_dtype(per_task.dtype)
    g = per_task.astype(dtype)
    total = jnp.sum(g, axis=0)
    abs_total = jnp.sum(jnp.abs(g), axis=0)
    purity = 0.5 * (1.0 + total / jnp.where(abs_total > 0, abs_total, 1.0))
    u = uniform.astype(dtype)
    mask = jnp.where(purity > u, g > 0, (u > purity) & (g < 0)).astype(dtype)
    if leak:
        mask = leak + (1.0 - leak) * mask
    return jnp.sum(mask * g, axis=0).astype(per_task.dtype)


# --------------------------------------------------------------------------- #
# States
# --------------------------------------------------------------------------- #


class EmptyAggState(NamedTuple):
    """No state (sum, mean, MGDA, CAGrad, IMTL-G, Aligned-MTL, Nash-MTL, UPGrad)."""


class KeyState(NamedTuple):
    """PRNG key (raw uint32[2]) split at every step (PCGrad, GradDrop)."""

    key: Array


class GradVacState(NamedTuple):
    """PRNG key and the (T, T) EMA of pairwise cosine targets (row i, column j)."""

    key: Array
    targets: Array


# --------------------------------------------------------------------------- #
# Building transforms from specs
# --------------------------------------------------------------------------- #


class _Spec(NamedTuple):
    # init_state(num_tasks or None) -> state
    init_state: Callable[[Optional[int]], Any]
    # apply(per_task_tree, state) -> (aggregated_tree, state)
    apply: Callable[[Any, Any], tuple[Any, Any]]


def _gram_spec(solve: Callable[[Array, Any], tuple[Array, Any]],
               init_state: Callable[[Optional[int]], Any]) -> _Spec:
    def apply(per_task, state):
        w, state = solve(tree_gram(per_task), state)
        return tree_combine(w, per_task), state

    return _Spec(init_state, apply)


def _stateless(_num_tasks: Optional[int]) -> EmptyAggState:
    return EmptyAggState()


def _key_state(seed: int):
    return lambda _t: KeyState(key=jax.random.PRNGKey(seed))


def _to_transform(spec: _Spec, num_tasks: Optional[int]) -> optax.GradientTransformation:
    def init_fn(params):
        del params  # the state never depends on the parameters' shapes
        return spec.init_state(num_tasks)

    def update_fn(updates, state, params=None):
        del params
        t = _num_tasks(updates)
        if num_tasks is not None and t != num_tasks:
            raise ValueError(f"aggregator built for {num_tasks} tasks got leading axis {t}")
        return spec.apply(updates, state)

    return optax.GradientTransformation(init_fn, update_fn)


# ----- spec builders (one per method) ----- #


def _sum_spec() -> _Spec:
    return _Spec(_stateless, lambda g, s: (jax.tree.map(lambda x: jnp.sum(x, axis=0), g), s))


def _mean_spec() -> _Spec:
    return _Spec(_stateless, lambda g, s: (jax.tree.map(lambda x: jnp.mean(x, axis=0), g), s))


def _pcgrad_spec(seed: int = 0) -> _Spec:
    def solve(gram, state):
        key, sub = jax.random.split(state.key)
        return pcgrad_weights(gram, sub), KeyState(key=key)

    return _gram_spec(solve, _key_state(seed))


def _mgda_spec(num_iters: int = 200, rescale: bool = False, solver: str = "auto") -> _Spec:
    _use_exact(solver, 1)  # validates `solver`

    def solve(gram, state):
        w = mgda_weights(gram, num_iters, solver)
        return (w * gram.shape[0] if rescale else w), state

    return _gram_spec(solve, _stateless)


def _cagrad_spec(c: float = 0.5, num_iters: int = 100, rescale: int = 1) -> _Spec:
    if c < 0:
        raise ValueError(f"cagrad: c must be >= 0, got {c}")
    if rescale not in (0, 1, 2):
        raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale}")
    return _gram_spec(lambda g, s: (cagrad_weights(g, c, num_iters, rescale), s), _stateless)


def _imtl_g_spec() -> _Spec:
    return _gram_spec(lambda g, s: (imtl_g_weights(g), s), _stateless)


def _gradvac_spec(beta: float = 0.01, seed: int = 0) -> _Spec:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}")

    def init_state(t):
        if t is None:
            raise ValueError("gradvac needs num_tasks (its state holds a T x T target matrix)")
        return GradVacState(key=jax.random.PRNGKey(seed), targets=jnp.zeros((t, t), jnp.float32))

    def solve(gram, state):
        key, sub = jax.random.split(state.key)
        w, targets = gradvac_weights(gram, state.targets.astype(gram.dtype), sub, beta)
        return w, GradVacState(key=key, targets=targets.astype(state.targets.dtype))

    return _gram_spec(solve, init_state)


def _aligned_mtl_spec(scale: str = "min") -> _Spec:
    if scale not in ("min", "median", "rmse"):
        raise ValueError(f"aligned_mtl: scale must be 'min', 'median' or 'rmse', got {scale!r}")
    return _gram_spec(lambda g, s: (aligned_mtl_weights(g, scale), s), _stateless)


def _nash_mtl_spec(num_iters: int = 20, ridge: float = 0.0) -> _Spec:
    return _gram_spec(lambda g, s: (nash_mtl_weights(g, num_iters, ridge), s), _stateless)


def _upgrad_spec(num_iters: int = 200, solver: str = "auto") -> _Spec:
    _use_exact(solver, 1)  # validates `solver`
    return _gram_spec(lambda g, s: (upgrad_weights(g, num_iters, solver), s), _stateless)


def _graddrop_spec(leak: float = 0.0, seed: int = 0) -> _Spec:
    if not 0.0 <= leak <= 1.0:
        raise ValueError(f"graddrop: leak must be in [0, 1], got {leak}")

    def apply(per_task, state):
        key, sub = jax.random.split(state.key)
        leaves, treedef = jax.tree.flatten(per_task)
        sizes = [math.prod(x.shape[1:]) for x in leaves]
        # One draw for the whole flattened model, sliced per leaf: identical to running
        # the matrix version on ravel_pytree of each task.
        u = jax.random.uniform(sub, (sum(sizes),), jnp.float32)
        out, offset = [], 0
        for leaf, n in zip(leaves, sizes):
            out.append(graddrop_combine(leaf, u[offset:offset + n].reshape(leaf.shape[1:]), leak))
            offset += n
        return jax.tree.unflatten(treedef, out), KeyState(key=key)

    return _Spec(_key_state(seed), apply)


# --------------------------------------------------------------------------- #
# Public transforms
# --------------------------------------------------------------------------- #


def sum_tasks(*, num_tasks: Optional[int] = None) -> optax.GradientTransformation:
    """Sum of the task gradients: ``d = sum_i g_i`` (gradient of the summed loss)."""
    return _to_transform(_sum_spec(), num_tasks)


def mean_tasks(*, num_tasks: Optional[int] = None) -> optax.GradientTransformation:
    """Mean of the task gradients: ``d = (1/T) sum_i g_i``."""
    return _to_transform(_mean_spec(), num_tasks)


def pcgrad(*, seed: int = 0, num_tasks: Optional[int] = None) -> optax.GradientTransformation:
    """PCGrad -- Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for
    Multi-Task Learning", NeurIPS 2020.

    Rule (the paper's Algorithm 1): for each task i, start from ``g_i' = g_i`` and
    visit every other task j in a random order; whenever ``<g_i', g_j> < 0`` set
    ``g_i' <- g_i' - <g_i', g_j>/||g_j||^2 g_j``. Return ``sum_i g_i'`` (the sum, as
    published; use ``optax.scale(1/T)`` after it for a mean). Each task draws its own
    permutation, fresh at every step, from the state's key.
    """
    return _to_transform(_pcgrad_spec(seed), num_tasks)


def mgda(*, num_iters: int = 200, rescale: bool = False, solver: str = "auto",
         num_tasks: Optional[int] = None) -> optax.GradientTransformation:
    """MGDA -- Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018 (the MGDA of Desideri 2012, applied to deep MTL).

    Rule: ``lam* = argmin_{lam in simplex} ||sum_i lam_i g_i||^2``; return
    ``d = sum_i lam*_i g_i`` (the min-norm point of the convex hull, as published and
    as LibMTL returns). ``rescale=True`` returns ``T * d`` instead, matching the scale
    of ``sum`` when all gradients agree. Solver (see ``mgda_weights``): exact support
    enumeration on the Gram matrix for T <= 8 ("auto"), else FISTA with restart,
    ``num_iters`` projected steps -- instead of the paper's Frank-Wolfe (same
    solution; FW converges sublinearly). The paper's MGDA-UB
    (gradients w.r.t. the shared representation) and gradient normalisation options
    are not implemented.
    """
    return _to_transform(_mgda_spec(num_iters, rescale, solver), num_tasks)


def cagrad(*, c: float = 0.5, num_iters: int = 100, rescale: int = 1,
           num_tasks: Optional[int] = None) -> optax.GradientTransformation:
    """CAGrad -- Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021.

    Rule: ``max_d min_i <g_i, d>`` s.t. ``||d - g0|| <= c ||g0||``, ``g0`` the mean
    gradient; via its dual over the simplex,
    ``d = g0 + c ||g0|| / ||g_w|| g_w`` with ``w = argmin_w <g_w, g0> + c||g0|| ||g_w||``.
    ``rescale`` 1 (default, the authors' experimental setting) returns
    ``d / (1 + c^2)``, 2 returns ``d / (1 + c)``, 0 returns ``d``. ``c = 0`` gives the
    mean. Solver: projected gradient on the Gram matrix with a parallel step search,
    ``num_iters`` steps (see ``cagrad_weights``).
    """
    return _to_transform(_cagrad_spec(c, num_iters, rescale), num_tasks)


def imtl_g(*, num_tasks: Optional[int] = None) -> optax.GradientTransformation:
    """IMTL-G -- Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial
    Multi-task Learning", ICLR 2021.

    Rule: ``d = sum_i alpha_i g_i`` with ``sum alpha = 1`` such that ``d`` has equal
    projections onto every unit gradient ``u_i = g_i/||g_i||``; closed form
    ``alpha_{2:T} = g_1 U^T (D U^T)^{-1}``, ``D = [g_1 - g_k]``, ``U = [u_1 - u_k]``,
    computed from the Gram matrix (see ``imtl_g_weights``). Only the gradient part
    (IMTL-G), not the loss-scale part (IMTL-L).
    """
    return _to_transform(_imtl_g_spec(), num_tasks)


def gradvac(*, num_tasks: int, beta: float = 0.01, seed: int = 0) -> optax.GradientTransformation:
    """GradVac -- Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models", ICLR 2021.

    Rule (whole-model granularity: one target per task pair): for each task i and every
    other j in a random order, with ``phi = cos(g_i', g_j)`` and target ``phit_ij``: if
    ``phi < phit_ij``,
    ``g_i' <- g_i' + ||g_i'|| (phit sqrt(1-phi^2) - phi sqrt(1-phit^2)) /
    (||g_j|| sqrt(1-phit^2)) g_j`` (which makes ``cos(g_i', g_j) = phit``); then
    ``phit_ij <- (1-beta) phit_ij + beta phi``. Targets start at 0 (so the first
    step is PCGrad). Returns ``sum_i g_i'``. Needs ``num_tasks`` for its state.
    """
    return _to_transform(_gradvac_spec(beta, seed), num_tasks)


def aligned_mtl(*, scale: str = "min",
                num_tasks: Optional[int] = None) -> optax.GradientTransformation:
    """Aligned-MTL -- Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component
    Alignment for Multi-Task Learning", CVPR 2023.

    Rule: eigendecompose ``G = M M^T = V diag(lam) V^T``; aligned gradients
    ``ghat = B M`` with ``B = sqrt(lam_min) V diag(lam^-1/2) V^T`` (orthogonal, equal
    norms: condition number 1, rescaled by the smallest singular value ``sqrt(lam_min)``,
    the published default); return ``sum_i ghat_i``. Other scales: ``scale="median"``,
    ``"rmse"`` (see ``aligned_mtl_basis``).
    """
    return _to_transform(_aligned_mtl_spec(scale), num_tasks)


def nash_mtl(*, num_iters: int = 20, ridge: float = 0.0,
             num_tasks: Optional[int] = None) -> optax.GradientTransformation:
    """Nash-MTL -- Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya,
    "Multi-Task Learning as a Bargaining Game", ICML 2022.

    Rule: ``d = sum_i alpha_i g_i`` with ``alpha > 0`` solving
    ``Gn alpha = 1/alpha`` elementwise, ``Gn = G/||G||_F`` (the published
    normalisation). Solved at every step by ``num_iters`` damped Newton steps on
    ``1/2 a^T Gn a - sum log a`` (see ``nash_mtl_weights``); the published solver is a
    concave-convex procedure with cvxpy, updated every step by default. The published
    optional gradient-norm clipping is left to ``optax.clip_by_global_norm`` in the
    chain.
    """
    return _to_transform(_nash_mtl_spec(num_iters, ridge), num_tasks)


def upgrad(*, num_iters: int = 200, solver: str = "auto",
           num_tasks: Optional[int] = None) -> optax.GradientTransformation:
    """UPGrad -- Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232, 2024 (TorchJD).

    Rule: project each ``g_i`` onto the dual cone ``{x : <g_j, x> >= 0 for all j}`` of
    the Jacobian's rows and average the projections:
    ``d = (1/T) sum_i argmin_{x in cone} ||x - g_i||^2``. Each projection is
    ``J^T v_i``, ``v_i = argmin_{v >= e_i} v^T G v`` (dual QP), solved exactly by
    support enumeration for T <= 8 ("auto"), else by FISTA with ``num_iters``
    iterations (see ``upgrad_weights``).
    """
    return _to_transform(_upgrad_spec(num_iters, solver), num_tasks)


def graddrop(*, leak: float = 0.0, seed: int = 0,
             num_tasks: Optional[int] = None) -> optax.GradientTransformation:
    """GradDrop -- Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just Pick a
    Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020.

    Rule, per coordinate: purity ``P = 1/2 (1 + sum_i g_i / sum_i |g_i|)``, ``U`` uniform
    in [0, 1); keep the positive components if ``P > U``, else the negative ones:
    ``d = sum_i (leak + (1 - leak) M_i) g_i``, ``leak = 0`` by default. Applied here
    to the per-task *parameter* gradients (the paper applies it at a chosen activation
    layer and back-propagates the masked gradient). ``U`` is drawn fresh each step
    from the state's key, over the flattened model.
    """
    return _to_transform(_graddrop_spec(leak, seed), num_tasks)


# --------------------------------------------------------------------------- #
# Matrix API
# --------------------------------------------------------------------------- #


class MatrixAggregator(NamedTuple):
    """An aggregator on a plain (T, P) matrix.

    ``init(num_tasks) -> state``; ``apply(matrix, state=None) -> (vector (P,), state)``
    (``state=None`` initialises from ``matrix.shape[0]``). Same code as the
    transform: the matrix is a one-leaf per-task pytree.
    """

    init: Callable[[int], Any]
    apply: Callable[..., tuple[Array, Any]]


_SPECS: dict[str, Callable[..., _Spec]] = {
    "sum": _sum_spec,
    "mean": _mean_spec,
    "pcgrad": _pcgrad_spec,
    "mgda": _mgda_spec,
    "cagrad": _cagrad_spec,
    "imtl_g": _imtl_g_spec,
    "gradvac": _gradvac_spec,
    "aligned_mtl": _aligned_mtl_spec,
    "nash_mtl": _nash_mtl_spec,
    "upgrad": _upgrad_spec,
    "graddrop": _graddrop_spec,
}


@functools.lru_cache(maxsize=None)
def _cached_matrix_aggregator(name: str, frozen_opts: tuple) -> tuple[Callable, Callable]:
    spec = _SPECS[name](**dict(frozen_opts))
    # One jitted function per (name, options): repeated calls reuse the compilation.
    return spec.init_state, jax.jit(spec.apply)


def aggregate_fn(name: str, **opts) -> MatrixAggregator:
    """The aggregator ``name`` (see ``registry.AGGREGATORS``) on a (T, P) matrix.

    ``apply`` is jitted (cached per name and options; options must be hashable).
    """
    if name not in _SPECS:
        raise KeyError(f"unknown aggregator {name!r}; known: {', '.join(sorted(_SPECS))}")
    opts = dict(opts)
    opts.pop("num_tasks", None)
    # Fill in the defaults so equal configurations share one cache entry.
    bound = inspect.signature(_SPECS[name]).bind(**opts)
    bound.apply_defaults()
    init_state, jitted = _cached_matrix_aggregator(name, tuple(sorted(bound.arguments.items())))

    def apply(matrix, state=None):
        if jnp.ndim(matrix) != 2:
            raise ValueError(f"aggregate_fn({name!r}) expects a (T, P) matrix, got shape "
                             f"{jnp.shape(matrix)}")
        if state is None:
            state = init_state(matrix.shape[0])
        return jitted(matrix, state)

    return MatrixAggregator(init=init_state, apply=apply)
