"""Dropout whose keep mask costs a quarter of the random hashes of `flax.linen.Dropout`.

`nn.Dropout` draws one float32 uniform per element, and with JAX's (partitionable)
threefry every 32-bit draw is one Threefry-2x32 hash whose 64 output bits are XOR-ed to
32. At full size BERT alone draws ~1.5 G of them per train step (the 500×500 attention
probabilities of 12 layers), and on a GPU the hashes are integer work that costs
milliseconds. Here every hash is kept whole and cut into four 16-bit uniforms u, and an
element is kept when u < round(keep·2¹⁶). The drop rate is then rate to within 2⁻¹⁷
(0.1 → 0.100006); the survivors are scaled by the inverse of the keep probability
actually used, so E[output] = input exactly, as with `nn.Dropout`.

The hash counters are a function of each element's position (an iota), so the mask does
not depend on how the array is sharded: a data-parallel step draws the same mask as the
single-device step. Keys whose implementation is not threefry (e.g. 'rbg') fall back to
`jax.random.bits`.

`IMPL` is an A/B switch for benchmarks: "hash16" (this) or "flax" (`nn.Dropout`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

IMPL = "hash16"

try:  # public since jax 0.4.2x; absent in a future jax → the jax.random.bits path
    from jax.extend.random import threefry2x32_p as _threefry2x32_p
except ImportError:  # pragma: no cover
    _threefry2x32_p = None

_UNIFORMS_PER_HASH = 4
_BITS = 16


def keep_threshold(rate: float) -> int:
    """Elements whose 16-bit uniform is below this are kept."""
    return int(round((1.0 - rate) * 2**_BITS))


def uniform16(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Independent uniform integers in [0, 2¹⁶) of `shape` (uint32), four per hash."""
    n = shape[-1]
    m = -(-n // _UNIFORMS_PER_HASH)
    hashed_shape = (*shape[:-1], m)
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    if _threefry2x32_p is not None and key_data.shape == (2,) and math.prod(hashed_shape) < 2**32:
        # Counter = the flat position in `hashed_shape`, built from iotas so that XLA fuses
        # it with the hash and the partitioner can split it along any axis.
        strides = np.cumprod((1,) + hashed_shape[::-1])[:-1][::-1]
        counter = sum(jax.lax.broadcasted_iota(jnp.uint32, hashed_shape, d) * jnp.uint32(s)
                      for d, s in enumerate(strides))
        hi, lo = _threefry2x32_p.bind(key_data[0], key_data[1], jnp.zeros_like(counter), counter)
        words = (hi, lo)
    else:
        words = tuple(jax.random.bits(k, hashed_shape, jnp.uint32) for k in jax.random.split(key))
    mask16 = jnp.uint32(0xFFFF)
    parts = [p for w in words for p in (w & mask16, w >> _BITS)]
    u = jnp.stack(parts, axis=-1).reshape(*shape[:-1], m * _UNIFORMS_PER_HASH)
    return u[..., :n]


class Dropout(nn.Module):
    """`nn.Dropout(rate)` with the cheaper mask above (same call signature, same rng stream)."""

    rate: float
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool) -> jax.Array:
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        rng = self.make_rng(self.rng_collection)
        if IMPL == "flax" or inputs.ndim == 0:
            keep_prob = 1.0 - self.rate
            mask = jax.random.bernoulli(rng, p=keep_prob, shape=inputs.shape)
            return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))
        threshold = keep_threshold(self.rate)
        keep = uniform16(rng, inputs.shape) < jnp.uint32(threshold)
        # Scale in float32: 1/0.9 rounded to bf16 would bias every survivor by 0.2%.
        scaled = (inputs.astype(jnp.float32) * jnp.float32(2**_BITS / threshold)).astype(inputs.dtype)
        return jnp.where(keep, scaled, jnp.zeros_like(inputs))
