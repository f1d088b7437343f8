"""Dropout with a choice of mask generator: JAX's threefry draw, or a 32-bit counter hash.

`nn.Dropout` draws its mask with `jax.random.bernoulli`: one Threefry-2x32 hash per element,
run in 64-bit counter arithmetic. BERT drops (B, L, 768) hidden states 25 times a step, and on
the GPU that draw is among the costliest elementwise work of the bf16 train step. `impl='hash'`
keeps every element with probability 1 − rate (to 2⁻²⁴) and scales by 1/(1 − rate), as
`nn.Dropout` does, but its bits are a hash of (seed, element index) in int32 arithmetic: a
few multiplies and shifts that XLA fuses into the consumer. Same distribution, other bits.
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


def hash_keys(seed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two int32 keys `hash_keep` mixes in, derived from one seed."""
    k1 = hash32(seed)
    return k1, hash32(k1 ^ _KEY2_SALT)


def hash_keep(index: jax.Array, k1: jax.Array, k2: jax.Array, rate: float) -> jax.Array:
    """Element `index` (int32, row-major position) kept iff hash(hash(index + k₁) ^ k₂) ≥ threshold."""
    bits = lax.shift_right_logical(hash32(hash32(index + k1) ^ k2), jnp.int32(32 - UNIFORM_BITS))
    return bits >= keep_threshold(rate)


def hash_keep_mask(seed: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean keep-mask of `shape`: `hash_keep` of every element's row-major position.

    Two keys derived from the seed, one on each side of the inner hash, so masks of different
    seeds are unrelated (with `hash(i + k)` alone, two seeds whose keys differ by less than
    the size would give shifted copies of one mask). The index is built from iotas so that
    XLA can partition it over a sharded batch."""
    index = jnp.zeros(shape, jnp.int32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.int32, shape, axis) * jnp.int32(stride)
        stride *= shape[axis]
    return hash_keep(index, *hash_keys(seed), rate)


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
