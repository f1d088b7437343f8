"""What two gradients are made of, where the form decides the bf16 step's cost on GPUs
(docs/perf_notes.md changes 56 and 58): checked on the jaxpr, so on the CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtjax.config import BertConfig
from mtjax.models import lstm, lstm_kernel
from mtjax.models.bert import FlaxBert
from tests._support import jaxpr_equations


def test_token_type_gradient_is_a_sum_not_a_scatter_of_every_token():
    """Every token is of type 0: the embedding reads row 0 once and broadcasts it, so its
    gradient sums the (B, L, D) cotangent instead of scatter-adding B·L rows into one row
    (on a GPU, B·L atomic adds per feature to the same address). Same values."""
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=40)
    ids = jax.random.randint(jax.random.key(0), (4, 40), 1, 50)
    params = FlaxBert(cfg).init(jax.random.key(1), ids)
    loss = lambda p: jnp.sum(FlaxBert(cfg).apply(p, ids) ** 2)
    token_table = params["params"]["embeddings"]["token_type_embeddings"]["embedding"].shape
    scatters = [eqn for eqn in jaxpr_equations(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
                if eqn.primitive.name.startswith("scatter") and eqn.invars[0].aval.shape == token_table]
    assert scatters, "control: the token-type table's gradient is found"
    for eqn in scatters:
        updates = eqn.invars[2].aval.shape
        assert np.prod(updates) <= cfg.hidden_size, updates
    # The gradient: row 0 holds the cotangent summed over every token, row 1 nothing.
    grads = jax.grad(loss)(params)["params"]["embeddings"]["token_type_embeddings"]["embedding"]
    assert float(jnp.max(jnp.abs(grads[1]))) == 0.0 and float(jnp.max(jnp.abs(grads[0]))) > 0.0


def test_lstm_recurrent_weight_gradient_runs_in_the_compute_dtype():
    """In bf16, the recurrent weight's gradient (one matmul over every step) takes bf16
    operands with float32 accumulation, as every other weight gradient: in float32 it ran
    as a TF32 matmul on GPUs, twice the time. Both recurrences (scan and kernel)."""
    z, t, b, h = 2, 5, 8, 16  # b ≠ h: the forward product (Z, B, 4H) is not W_hh-shaped
    projected = jax.random.normal(jax.random.key(0), (t, z, b, 4 * h))
    w_hh = 0.1 * jax.random.normal(jax.random.key(1), (z, h, 4 * h))
    b_hh = jnp.zeros((z, 4 * h))
    forms = {
        "scan": lambda w: jnp.sum(lstm.recurrence(projected, w, b_hh, jnp.bfloat16)),
        "kernel": lambda w: jnp.sum(lstm_kernel.recurrence(jnp.moveaxis(projected, 2, 0), w, b_hh, jnp.bfloat16)),
    }
    for name, loss in forms.items():
        dots = [eqn for eqn in jaxpr_equations(jax.make_jaxpr(jax.grad(loss))(w_hh).jaxpr)
                if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape == w_hh.shape]
        assert len(dots) == 1, (name, dots)
        (dot,) = dots
        assert [v.aval.dtype for v in dot.invars] == [jnp.bfloat16, jnp.bfloat16], name
        assert dot.outvars[0].aval.dtype == jnp.float32, name
