"""A bidirectional multi-layer LSTM equal to `torch.nn.LSTM(batch_first=True, bidirectional=True)`.

Same structure as PyTorch: gates ordered (i, f, g, o), two biases (`bias_ih`, `bias_hh`)
added separately, layer k+1 reads the concatenation [forward, backward] of layer k, no
packing (the padded rows are run through like any other, as in the original).

Parameters per layer: `weight_ih` (2, in, 4H), `weight_hh` (2, H, 4H), `bias_ih` (2, 4H),
`bias_hh` (2, 4H); index 0 is the forward direction, 1 the backward (`*_reverse` in
PyTorch), kernels stored (in, out) i.e. transposed from PyTorch.

For speed the input projection of all time steps is one matmul, and both directions
advance in one `lax.scan` (the backward direction scans the time-reversed input), so the
recurrence is the only sequential part.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn


def _torch_lstm_init(hidden: int):
    bound = 1.0 / jnp.sqrt(hidden)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BiLSTMLayer(nn.Module):
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, _, in_dim = x.shape
        h4 = 4 * self.hidden
        init = _torch_lstm_init(self.hidden)
        w_ih = self.param("weight_ih", init, (2, in_dim, h4)).astype(self.dtype)
        w_hh = self.param("weight_hh", init, (2, self.hidden, h4)).astype(self.dtype)
        b_ih = self.param("bias_ih", init, (2, h4)).astype(self.dtype)
        b_hh = self.param("bias_hh", init, (2, h4)).astype(self.dtype)

        x = x.astype(self.dtype)
        both = jnp.stack([x, x[:, ::-1]])  # (2, B, T, in): backward reads time reversed
        projected = jnp.einsum("zbti,zig->tzbg", both, w_ih) + b_ih[None, :, None, :]

        def step(carry, proj_t):
            h, c = carry  # (2, B, H) each, state kept in float32
            gates = proj_t + jnp.einsum("zbh,zhg->zbg", h.astype(self.dtype), w_hh) + b_hh[:, None, :]
            gates = gates.astype(jnp.float32)
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((2, batch, self.hidden), jnp.float32)
        _, hs = jax.lax.scan(step, (zeros, zeros), projected)  # (T, 2, B, H)
        forward = jnp.swapaxes(hs[:, 0], 0, 1)
        backward = jnp.swapaxes(hs[::-1, 1], 0, 1)
        return jnp.concatenate([forward, backward], axis=-1).astype(self.dtype)


class BiLSTM(nn.Module):
    """(B, T, in) → (B, T, 2H): the output sequence of the last layer."""

    hidden: int
    num_layers: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for k in range(self.num_layers):
            x = BiLSTMLayer(self.hidden, self.dtype, name=f"layer_{k}")(x)
        return x
