"""HICCAP's fusion blocks: cross-attention, drop-norms, projections and additive pooling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from mtjax.models.attention import Dense, dot_product_attention, split_heads
from mtjax.models.dropout import Dropout

# The fusion's LayerNorms all use PyTorch's default eps (SPEC §2).
FUSION_LN_EPS = 1e-5
# The original's additive masking constant (BERT-style extended mask).
MASK_NEG = -10000.0
# The original adds this to every pooling weight before normalising.
POOL_EPS = 1e-10


class BertOutAttention(nn.Module):
    """Multi-head cross-attention with no output projection: `hidden` attends to `context`."""

    hidden_size: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    dropout_impl: str = "threefry"  # ModelConfig.dropout_impl

    @nn.compact
    def __call__(self, hidden, context, context_mask, *, deterministic: bool):
        dense = lambda name: Dense(self.hidden_size, dtype=self.dtype, name=name)
        q = split_heads(dense("query")(hidden), self.num_heads)
        k = split_heads(dense("key")(context), self.num_heads)
        v = split_heads(dense("value")(context), self.num_heads)
        bias = ((1.0 - context_mask.astype(jnp.float32)) * MASK_NEG)[:, None, None, :]
        return dot_product_attention(q, k, v, bias=bias, dropout=Dropout(0.1, impl=self.dropout_impl),
                                     deterministic=deterministic)


class DropNorm(nn.Module):
    """PyTorch's `nn.Sequential(nn.Dropout(rate), nn.LayerNorm(dim))`."""

    rate: float = 0.2
    dtype: jnp.dtype = jnp.float32
    dropout_impl: str = "threefry"  # ModelConfig.dropout_impl

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        x = Dropout(self.rate, impl=self.dropout_impl)(x, deterministic=deterministic)
        return nn.LayerNorm(epsilon=FUSION_LN_EPS, dtype=self.dtype, name="norm")(x)


class Projection(nn.Module):
    """`sequential_image` / `sequential_audio`: Linear → LayerNorm → Dropout(0.3)."""

    features: int
    dtype: jnp.dtype = jnp.float32
    dropout_impl: str = "threefry"  # ModelConfig.dropout_impl

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        x = Dense(self.features, dtype=self.dtype, name="linear")(x)
        x = nn.LayerNorm(epsilon=FUSION_LN_EPS, dtype=self.dtype, name="norm")(x)
        return Dropout(0.3, impl=self.dropout_impl)(x, deterministic=deterministic)


def faithful_pool_weights(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """The original: a = m·exp(s) + ε; a = m·a / Σa. Overflows to NaN once s > ~88."""
    a = mask * jnp.exp(scores) + POOL_EPS
    return mask * a / jnp.sum(a, axis=1, keepdims=True)


def stable_pool_weights(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """The same function in log space: a = m · softmax(log(m·eˢ + ε)), finite for any finite s.

    log(m·eˢ + ε) = logaddexp(s + log m, log ε); positions with m = 0 contribute log ε,
    exactly the ε the original adds there too.
    """
    log_eps = jnp.float32(math.log(POOL_EPS))
    on = mask > 0
    safe_mask = jnp.where(on, mask, 1.0)  # keeps log() and its gradient finite where m = 0
    logits = jnp.where(on, jnp.logaddexp(scores + jnp.log(safe_mask), log_eps), log_eps)
    return mask * jax.nn.softmax(logits, axis=1)


class AdditivePooling(nn.Module):
    """The original `Attention(d)`: u = tanh(W h + b), s = u·v, weighted sum of h."""

    hidden_size: int
    mode: str = "stable"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, mask):
        v = self.param("v", nn.initializers.uniform(scale=1.0), (self.hidden_size,))
        u = jnp.tanh(Dense(self.hidden_size, dtype=self.dtype, name="linear")(h))
        scores = jnp.einsum("bld,d->bl", u.astype(jnp.float32), v)
        mask = mask.astype(jnp.float32)
        if self.mode == "faithful":
            weights = faithful_pool_weights(scores, mask)
        elif self.mode == "stable":
            weights = stable_pool_weights(scores, mask)
        else:
            raise ValueError(f"pooling mode must be 'faithful' or 'stable', got {self.mode!r}")
        return jnp.einsum("bl,bld->bd", weights, h.astype(jnp.float32)).astype(self.dtype)


class CrossBranch(nn.Module):
    """One hierarchical branch: attend to two contexts in turn with ONE shared attention
    module, each call followed by its own drop-norm, then add the query back."""

    hidden_size: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    dropout_impl: str = "threefry"  # ModelConfig.dropout_impl

    def setup(self):
        self.attention = BertOutAttention(self.hidden_size, self.num_heads, self.dtype, self.dropout_impl)
        self.drop_norm1 = DropNorm(0.2, self.dtype, self.dropout_impl)
        self.drop_norm2 = DropNorm(0.2, self.dtype, self.dropout_impl)

    def __call__(self, query, first, first_mask, second, second_mask, *, deterministic: bool,
                 capture: dict | None = None, prefix: str = ""):
        x = self.drop_norm1(self.attention(query, first, first_mask, deterministic=deterministic),
                            deterministic=deterministic)
        if capture is not None:
            capture[f"{prefix}_first"] = x
        x = self.drop_norm2(self.attention(x, second, second_mask, deterministic=deterministic),
                            deterministic=deterministic)
        return x + query
