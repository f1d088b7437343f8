"""Dropout with a choice of mask generator: JAX's threefry draw, or a 32-bit counter hash.

`nn.Dropout` draws its mask with `jax.random.bernoulli`: one Threefry-2x32 hash per element,
run in 64-bit counter arithmetic. BERT drops (B, L, 768) hidden states 25 times a step, and on
the GPU that draw is among the costliest elementwise work of the bf16 train step. `impl='hash'`
keeps every element with probability 1 − rate (to 2⁻²⁴) and scales by 1/(1 − rate), as
`nn.Dropout` does, but its bits come from int32 arithmetic that XLA fuses into the consumer
and the fused kernels redraw in place. Same distribution, other bits.

The mask is a row/column hash: each row (every position but the last axis) gets a full-quality
key, each column (the last axis) a key of its own, and an element's bits are `mix32(row key ^
column key)`: two multiplies and a shift per element instead of two full hashes. The keys are
shared: a row's once per row, a column's once per column. (A finisher with one multiply is
not enough: it leaves pairs of rows visibly correlated; `mix32` passes the same pair
statistics as a full hash per element, tests/test_dropout.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from jax import lax

from mtjax.config import DROPOUT_IMPLS

# Uniforms are the top 24 bits of the hash: enough resolution for any dropout rate.
UNIFORM_BITS = 24

# lowbias32's multipliers as int32 (two's complement of the unsigned constants).
_MUL1, _MUL2 = (np.uint32(c).view(np.int32) for c in (0x7FEB352D, 0x846CA68B))
# Odd constant separating the two keys derived from one seed.
_KEY2_SALT = np.uint32(0x9E3779B9).view(np.int32)
# Odd constant making the column keys another sequence than the rows'.
_COLUMN_SALT = np.uint32(0x85EBCA6B).view(np.int32)


def hash32(x: jax.Array) -> jax.Array:
    """A 32-bit integer mixer ("lowbias32", C. Wellons) on int32 with wrapping products:
    a bijection whose every output bit depends on every input bit. Plain xor, logical shift
    and multiply, so it runs in XLA and inside Triton kernels alike."""
    x = x ^ lax.shift_right_logical(x, jnp.int32(16))
    x = x * _MUL1
    x = x ^ lax.shift_right_logical(x, jnp.int32(15))
    x = x * _MUL2
    return x ^ lax.shift_right_logical(x, jnp.int32(16))


def keep_threshold(rate: float) -> jnp.int32:
    """Elements whose top `UNIFORM_BITS` hash bits are ≥ this are kept: P(keep) = 1 − rate."""
    return jnp.int32(round(rate * (1 << UNIFORM_BITS)))


def seed_from_key(key: jax.Array) -> jax.Array:
    """An int32 seed drawn from a JAX PRNG key."""
    return lax.bitcast_convert_type(jax.random.bits(key, (), jnp.uint32), jnp.int32)


def mix32(x: jax.Array) -> jax.Array:
    """An element's bits from its row key ^ column key: lowbias32's two multiplies around
    one xor-shift (the keys are already well mixed, so the outer xor-shifts add little)."""
    x = x * _MUL1
    x = x ^ lax.shift_right_logical(x, jnp.int32(15))
    return x * _MUL2


def hash_keys(seed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two int32 keys `row_key` mixes in, derived from one seed."""
    k1 = hash32(seed)
    return k1, hash32(k1 ^ _KEY2_SALT)


def row_key(row: jax.Array, k1: jax.Array, k2: jax.Array) -> jax.Array:
    """A row's key: hash(hash(row + k₁) ^ k₂). Two keys, one on each side of the inner hash,
    so masks of different seeds are unrelated (with hash(row + k) alone, two seeds whose keys
    differ by less than the row count would give shifted copies of one mask)."""
    return hash32(hash32(row + k1) ^ k2)


def column_key(col: jax.Array) -> jax.Array:
    """A column's key (the same for every seed: the row keys carry the seed)."""
    return hash32(col ^ _COLUMN_SALT)


def keep_bits(bits: jax.Array, rate: float) -> jax.Array:
    """Kept iff the top `UNIFORM_BITS` of `bits` are ≥ the threshold: P(keep) = 1 − rate."""
    return lax.shift_right_logical(bits, jnp.int32(32 - UNIFORM_BITS)) >= keep_threshold(rate)


def hash_keep(row_keys: jax.Array, col_keys: jax.Array, rate: float) -> jax.Array:
    """The keep-mask of elements (row, col) from their keys (broadcast against each other)."""
    return keep_bits(mix32(row_keys ^ col_keys), rate)


def hash_keep_mask(seed: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean keep-mask of `shape`: `hash_keep` with the row-major index of the leading axes
    as the row and the last axis as the column. The row index is built from iotas so that
    XLA can partition it over a sharded batch; the keys are computed on (..., 1) and (C,)
    arrays and broadcast, so each is hashed once."""
    lead = (*shape[:-1], 1)
    row = jnp.zeros(lead, jnp.int32)
    stride = 1
    for axis in reversed(range(len(lead) - 1)):
        row = row + lax.broadcasted_iota(jnp.int32, lead, axis) * jnp.int32(stride)
        stride *= lead[axis]
    col = jnp.arange(shape[-1], dtype=jnp.int32)
    return hash_keep(row_key(row, *hash_keys(seed)), column_key(col), rate)


class Dropout(nn.Dropout):
    """`nn.Dropout` (same name in module paths, same rng stream) with `impl`: 'threefry' is
    `nn.Dropout` itself; 'hash' draws one int32 seed from the same rng and masks by
    `hash_keep_mask`."""

    impl: str = "threefry"

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng: jax.Array | None = None):
        if self.impl == "threefry":
            return super().__call__(inputs, deterministic=deterministic, rng=rng)
        if self.impl != "hash":
            raise ValueError(f"dropout impl must be one of {DROPOUT_IMPLS}, got {self.impl!r}")
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep = hash_keep_mask(self.hash_seed(rng), inputs.shape, self.rate)
        return lax.select(keep, inputs / jnp.asarray(1.0 - self.rate, inputs.dtype), jnp.zeros_like(inputs))

    def hash_seed(self, rng: jax.Array | None = None) -> jax.Array:
        """The int32 seed of this call's 'hash' mask, drawn from the module's rng stream: a
        fused kernel that draws the mask itself gets the same mask as the module would."""
        return seed_from_key(self.make_rng(self.rng_collection) if rng is None else rng)
