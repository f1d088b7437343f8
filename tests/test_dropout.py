"""mtjax.models.dropout: the 16-bit-uniform mask is a correct dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax.models import dropout as dropout_mod
from mtjax.models.dropout import Dropout, keep_threshold, uniform16


def _apply(rate, x, key, deterministic=False):
    return Dropout(rate).apply({}, x, deterministic=deterministic, rngs={"dropout": key})


def test_uniforms_cover_16_bits_and_are_uncorrelated():
    u = np.asarray(uniform16(jax.random.PRNGKey(0), (8, 3, 41, 37)))  # last dim not a multiple of 4
    assert u.shape == (8, 3, 41, 37) and u.min() >= 0 and u.max() < 2**16
    # 36k draws: mean of U[0, 1) within 5 standard errors (0.289/√n).
    flat = u.reshape(-1) / 2**16
    assert abs(flat.mean() - 0.5) < 5 * 0.289 / np.sqrt(flat.size)
    # Neighbours (same hash, and across hashes) are uncorrelated; each of the 16 bits is fair.
    for lag in (1, 2, 4, 37):
        assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 0.03
    bits = (u.reshape(-1)[:, None] >> np.arange(16)) & 1
    assert np.all(np.abs(bits.mean(axis=0) - 0.5) < 0.02)


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_drop_rate_and_expectation(rate):
    x = jnp.full((64, 500, 8), 2.0)
    y = np.asarray(_apply(rate, x, jax.random.PRNGKey(3)))
    dropped = (y == 0).mean()
    p = 1 - keep_threshold(rate) / 2**16
    assert abs(p - rate) < 2**-16
    assert abs(dropped - p) < 5 * np.sqrt(p * (1 - p) / y.size)
    # Survivors scaled by the inverse of the keep probability actually used.
    np.testing.assert_allclose(y[y != 0], 2.0 * 2**16 / keep_threshold(rate), rtol=1e-6)


def test_bf16_survivors_scaled_in_float32():
    x = jnp.full((16, 256), 1.5, jnp.bfloat16)
    y = _apply(0.1, x, jax.random.PRNGKey(0))
    assert y.dtype == jnp.bfloat16
    kept = np.asarray(y.astype(jnp.float32))[np.asarray(y) != 0]
    expected = float(jnp.asarray(1.5 * 2**16 / keep_threshold(0.1), jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(kept, expected)


def test_keys_and_passthrough():
    x = jnp.ones((32, 128))
    a = _apply(0.5, x, jax.random.PRNGKey(0))
    b = _apply(0.5, x, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, _apply(0.5, x, jax.random.PRNGKey(0)))  # deterministic given the key
    both = float(jnp.mean((a == 0) & (b == 0)))
    assert abs(both - 0.25) < 0.03                                        # independent across keys
    np.testing.assert_array_equal(_apply(0.5, x, jax.random.PRNGKey(0), deterministic=True), x)
    np.testing.assert_array_equal(_apply(0.0, x, jax.random.PRNGKey(0)), x)
    np.testing.assert_array_equal(_apply(1.0, x, jax.random.PRNGKey(0)), jnp.zeros_like(x))
    # New-style typed keys draw the same mask as the raw key data.
    np.testing.assert_array_equal(_apply(0.5, x, jax.random.wrap_key_data(jax.random.PRNGKey(0))), a)


def test_flax_switch_keeps_the_rate(monkeypatch):
    monkeypatch.setattr(dropout_mod, "IMPL", "flax")
    y = np.asarray(_apply(0.25, jnp.ones((200, 200)), jax.random.PRNGKey(0)))
    assert abs((y == 0).mean() - 0.25) < 0.01
