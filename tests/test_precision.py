"""Mixed precision (`ModelConfig(dtype='bfloat16')`): bf16 compute, fp32 everything that
accumulates.

- Parameters, gradients, Adam moments and BatchNorm statistics stay float32.
- Every reduction (softmax max/sum, LayerNorm and BatchNorm moments, pooling sums, the
  loss means) and every exp/log/sigmoid/erf/rsqrt runs on float32 operands (checked on the
  traced program, so a bf16 statistic anywhere in the model fails the test).
- A bf16 forward stays close to the fp32 forward of the same weights, with a tolerance
  derived from bf16's precision below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax.config import tiny_model_config
from mtjax.losses import masked_bce
from mtjax.models.hiccap import MODEL_INPUTS, HICCAP, init_variables
from mtjax.mtl.weightings import predefined
from mtjax.train_step import init_train_state, make_optimizer, make_train_step
from tests._support import jaxpr_equations, random_batch

C32 = tiny_model_config()
C16 = C32.replace(dtype="bfloat16")
# bf16 keeps 8 significant bits: one rounding is ≤ 2^-9 ≈ 2e-3 relative. Through 2 BERT
# layers, 2 LSTM layers, 6 attention calls and the poolings the roundings add up to a
# relative error measured at ~0.7% on the hidden states; 3% leaves room for other seeds
# while still failing for anything coarser than bf16 (fp16-range overflow, a dropped
# residual, fp8). Probabilities are in [0, 1]: 0.03 absolute for the same reason.
REL_TOL = 3e-2
PROB_TOL = 3e-2

REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin",
              "cumsum", "cumprod", "cummax", "cumlogsumexp"}
PRECISE = {"exp", "exp2", "log", "log1p", "logistic", "erf", "erfc", "erf_inv", "rsqrt"}


@pytest.fixture(scope="module")
def setup():
    variables = init_variables(C16, jax.random.PRNGKey(0))
    batch = random_batch(C32, 8, seed=3)
    return variables, batch


def _forward(config, variables, batch, train):
    capture = {}
    out = HICCAP(config).apply(variables, {k: batch[k] for k in MODEL_INPUTS}, train=train, deterministic=True,
                               capture=capture, mutable=["batch_stats"] if train else False)
    return (out[0] if train else out), capture


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_params_and_statistics_are_float32(setup):
    variables, _ = setup
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-mode"])
def test_bf16_forward_is_close_to_fp32(setup, train):
    variables, batch = setup
    p32, c32 = _forward(C32, variables, batch, train)
    p16, c16 = _forward(C16, variables, batch, train)
    for key in ("bert", "rnn_img", "rnn_audio", "att1", "features"):
        assert c16[key].dtype == jnp.bfloat16, key          # bf16 compute really happened ...
        rel = _rel(c32[key], c16[key])
        assert 1e-4 < rel <= REL_TOL, (key, rel)              # ... and stayed close to fp32
    for task in C32.tasks:
        assert p16[task].dtype == jnp.float32                # softmax output in fp32
        assert float(np.max(np.abs(np.asarray(p32[task]) - np.asarray(p16[task])))) <= PROB_TOL, task


def _exempt(eqn) -> bool:
    """The task heads' Dense layers are plain `nn.Dense` (mtjax/models/heads.py): their bias
    gradients sum over the batch only (≤ a few dozen rows) in bf16. Every other Dense in the
    model uses `attention.Dense`, whose bias gradient accumulates in float32."""
    stack = str(eqn.source_info.name_stack)
    return eqn.primitive.name == "reduce_sum" and "/heads_" in stack and "transpose(" in stack


def _check_jaxpr(jaxpr, bad):
    for eqn in jaxpr_equations(jaxpr):
        name = eqn.primitive.name
        if name in REDUCTIONS | PRECISE and not _exempt(eqn):
            for v in eqn.invars:
                dtype = getattr(v.aval, "dtype", None)
                if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and dtype != jnp.float32:
                    bad.append(f"{name} on {dtype} ({eqn.source_info.name_stack})")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-mode"])
def test_statistics_and_transcendentals_run_in_float32(setup, train):
    variables, batch = setup

    def loss(params):
        probs, _ = _forward(C16, {**variables, "params": params}, batch, train)
        return sum(masked_bce(probs[t], batch["labels"][t]) for t in C16.tasks)

    # The gradient too: backward reductions (bias gradients, BatchNorm's) must stay fp32.
    closed = jax.make_jaxpr(jax.value_and_grad(loss))(variables["params"])
    bad: list[str] = []
    _check_jaxpr(closed.jaxpr, bad)
    assert not bad, bad[:10]


def test_bf16_train_step_keeps_fp32_master_weights(setup):
    variables, batch = setup
    opt = make_optimizer("adam", lr=1e-3)
    weighting = predefined((0.1, 0.4, 0.2, 0.2))
    results = {}
    for name, config in (("fp32", C32), ("bf16", C16)):
        state = init_train_state(variables, opt, weighting, None, num_tasks=4, rng=jax.random.PRNGKey(1))
        step = jax.jit(make_train_step(config, opt, weighting, deterministic=True))
        state, metrics = step(state, batch, np.ones(4, np.float32))
        results[name] = (state, metrics)
    state, metrics = results["bf16"]
    assert int(metrics["finite"]) == 1 and metrics["loss"].dtype == jnp.float32
    for tree in (state.params, state.batch_stats, state.opt_state):
        assert {x.dtype for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)} \
            == {jnp.dtype(jnp.float32)}
    # Same loss within bf16 noise, and the update points the same way as fp32's.
    (s32, m32), (s16, m16) = results["fp32"], results["bf16"]
    assert abs(float(m16["loss"]) - float(m32["loss"])) <= REL_TOL * float(m32["loss"])
    d32 = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree_util.tree_leaves(s32.params),
                                                           jax.tree_util.tree_leaves(variables["params"]))])
    d16 = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree_util.tree_leaves(s16.params),
                                                           jax.tree_util.tree_leaves(variables["params"]))])
    cosine = float(d32 @ d16 / (np.linalg.norm(d32) * np.linalg.norm(d16)))
    assert cosine > 0.9, cosine
