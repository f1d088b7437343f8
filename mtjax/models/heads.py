"""Task heads and a BatchNorm that behaves exactly like `torch.nn.BatchNorm1d`."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from mtjax.models.dropout import Dropout


class TorchBatchNorm(nn.Module):
    """`torch.nn.BatchNorm1d` semantics, which Flax's BatchNorm does not match exactly.

    Training normalises with the biased batch variance but updates `var` with the
    unbiased one (n/(n-1)); `momentum` weighs the NEW value (PyTorch's convention).
    An optional per-example `mask` (B,) leaves padded rows out of the statistics, so a
    batch padded to a fixed shape gives the same statistics as the unpadded one.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        xf = x.astype(jnp.float32)
        if train:
            w = jnp.ones((x.shape[0],), jnp.float32) if mask is None else mask.astype(jnp.float32)
            n = jnp.sum(w)
            mean = jnp.einsum("b,bf->f", w, xf) / n
            var = jnp.einsum("b,bf->f", w, jnp.square(xf - mean)) / n
            if not self.is_initializing():
                m = self.momentum
                unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
                running_mean.value = (1 - m) * running_mean.value + m * jax.lax.stop_gradient(mean)
                running_var.value = (1 - m) * running_var.value + m * jax.lax.stop_gradient(unbiased)
        else:
            mean, var = running_mean.value, running_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x.dtype)


class TaskHead(nn.Module):
    """Linear → BN → Dropout → Linear → BN → Dropout → Linear → Linear (no non-linearities).

    Returns the pre-softmax logits (B, 2); the model applies the softmax.
    """

    dims: Sequence[int] = (200, 40, 20)
    dtype: jnp.dtype = jnp.float32
    dropout_impl: str = "threefry"  # ModelConfig.dropout_impl

    @nn.compact
    def __call__(self, x, *, train: bool, deterministic: bool, mask=None):
        h0, h1, h2 = self.dims
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
        x = dense(h0, "linear0")(x)
        x = TorchBatchNorm(name="bn0")(x, train=train, mask=mask)
        x = Dropout(0.3, impl=self.dropout_impl)(x, deterministic=deterministic)
        x = dense(h1, "linear1")(x)
        x = TorchBatchNorm(name="bn1")(x, train=train, mask=mask)
        x = Dropout(0.3, impl=self.dropout_impl)(x, deterministic=deterministic)
        x = dense(h2, "linear2")(x)
        return dense(2, "linear3")(x).astype(jnp.float32)
