"""Scaled dot-product attention shared by BERT and the fusion's cross-attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, L, d) -> (B, L, H, d/H)."""
    b, l, d = x.shape
    return x.reshape(b, l, num_heads, d // num_heads)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None,
    dropout: nn.Dropout,
    deterministic: bool,
) -> jax.Array:
    """softmax(q·kᵀ/√dₕ + bias) · v over heads laid out (B, L, H, dₕ); returns (B, Lq, H·dₕ).

    Written out (not `jax.nn.dot_product_attention`) because both BERT and the fusion put
    dropout on the attention probabilities, which the fused kernels do not offer.
    Softmax statistics run in float32 whatever the compute dtype.
    """
    depth = q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(depth, q.dtype))
    scores = scores.astype(jnp.float32)
    if bias is not None:
        scores = scores + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    probs = dropout(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    b, lq, h, dh = out.shape
    return out.reshape(b, lq, h * dh)
