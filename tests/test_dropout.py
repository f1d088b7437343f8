"""`mtjax.models.dropout.Dropout`: 'threefry' is nn.Dropout bit for bit; 'hash' has
nn.Dropout's distribution (keep rate, scale, independence across seeds and positions)."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtjax.config import BertConfig, ConfigError, tiny_model_config
from mtjax.models.bert import FlaxBert
from mtjax.models.dropout import Dropout, hash_keep_mask
from mtjax.models.hiccap import HICCAP, MODEL_INPUTS, init_variables
from tests._support import jaxpr_equations, random_batch


def _apply(module, x, key, deterministic=False):
    return module.apply({}, x, deterministic=deterministic, rngs={"dropout": key})


def test_threefry_impl_is_nn_dropout_bit_for_bit():
    x = jax.random.normal(jax.random.key(0), (4, 50, 16))
    ours = _apply(Dropout(0.3), x, jax.random.key(1))
    flax_ = _apply(nn.Dropout(0.3), x, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(flax_))


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_hash_mask_keeps_one_minus_rate_and_scales_like_nn_dropout(rate):
    x = jnp.ones((64, 100, 48), jnp.float32)
    y = np.asarray(_apply(Dropout(rate, impl="hash"), x, jax.random.key(2)))
    kept = y != 0
    n = kept.size
    # Binomial(n, 1 - rate): 5 standard deviations.
    assert abs(kept.mean() - (1 - rate)) < 5 * math.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(y[kept], 1.0 / (1.0 - rate), rtol=1e-7)
    # No structure along any axis: every row, column and depth slice keeps about 1 - rate.
    for axis in range(3):
        frac = kept.mean(axis=tuple(a for a in range(3) if a != axis))
        per = n / kept.shape[axis]
        assert np.all(np.abs(frac - (1 - rate)) < 6 * math.sqrt(rate * (1 - rate) / per))


def test_hash_masks_of_different_seeds_and_neighbours_are_independent():
    shape = (400, 1000)
    a = np.asarray(hash_keep_mask(jnp.int32(11), shape, 0.5))
    b = np.asarray(hash_keep_mask(jnp.int32(12), shape, 0.5))
    tol = 5 * math.sqrt(0.25 * 0.75 / a.size)
    assert abs((a & b).mean() - 0.25) < tol  # seeds one apart: unrelated masks
    flat = a.reshape(-1)
    assert abs((flat[1:] & flat[:-1]).mean() - 0.25) < tol  # neighbouring elements too
    # Shifting one mask never reproduces another (what `hash(i + seed)` alone would allow).
    for shift in (1, 7, 1000):
        assert abs((flat[shift:] == b.reshape(-1)[:-shift]).mean() - 0.5) < 5 * math.sqrt(0.25 / flat.size)


def test_hash_dropout_gradient_is_the_mask_over_keep_and_eval_is_identity():
    x = jax.random.normal(jax.random.key(3), (8, 30, 16))
    drop = Dropout(0.2, impl="hash")
    key = jax.random.key(4)
    g = jax.grad(lambda v: jnp.sum(_apply(drop, v, key)))(x)
    kept = np.asarray(_apply(drop, x, key)) != 0
    np.testing.assert_allclose(np.asarray(g), kept / 0.8, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(_apply(drop, x, key, deterministic=True)), np.asarray(x))
    assert np.asarray(_apply(drop, x, jax.random.key(5))).tolist() != np.asarray(_apply(drop, x, key)).tolist()


def test_bert_hidden_dropout_impl_changes_training_masks_only():
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=40)
    hashed = BertConfig(**{**cfg.__dict__, "hidden_dropout_impl": "hash"})
    ids = jax.random.randint(jax.random.key(6), (2, 40), 0, 50)
    variables = FlaxBert(cfg).init(jax.random.key(7), ids)
    rngs = {"dropout": jax.random.key(8)}
    out = {c.hidden_dropout_impl: (FlaxBert(c).apply(variables, ids),
                                  FlaxBert(c).apply(variables, ids, deterministic=False, rngs=rngs))
           for c in (cfg, hashed)}
    np.testing.assert_array_equal(np.asarray(out["hash"][0]), np.asarray(out["threefry"][0]))
    assert np.all(np.isfinite(np.asarray(out["hash"][1])))
    assert not np.allclose(np.asarray(out["hash"][1]), np.asarray(out["threefry"][1]))
    assert "hidden_dropout_impl" not in hashed.to_hf_dict()  # a runtime choice, not a weight
    with pytest.raises(ConfigError, match="hidden_dropout_impl must be one of"):
        BertConfig(hidden_dropout_impl="philox")


def _pair_correlations(mask: np.ndarray) -> np.ndarray:
    """Correlations of every pair of rows of a 0/1 mask, standardised: N(0, 1) if independent."""
    z = mask - mask.mean(axis=1, keepdims=True)
    z /= z.std(axis=1, keepdims=True)
    corr = z @ z.T / mask.shape[1]
    return corr[~np.eye(len(mask), dtype=bool)] * math.sqrt(mask.shape[1])


def test_row_column_hash_leaves_no_pair_of_rows_or_columns_correlated():
    # The mask is mix32(row key ^ column key): every pair of rows (and of columns) shares the
    # other side's keys. A one-multiply finisher fails this (variance ~1.3, max ~35 σ).
    mask = np.asarray(hash_keep_mask(jnp.int32(5), (512, 2048), 0.1), np.float64)
    for pairs in (_pair_correlations(mask), _pair_correlations(mask[:, :512].T)):
        assert abs(pairs.var() - 1) < 0.05, pairs.var()  # ~130,000 pairs: σ of the variance ≈ 0.004
        assert np.abs(pairs).max() < 6.5, np.abs(pairs).max()


def _random_draws(jaxpr) -> list[int]:
    """Sizes of the outputs of every PRNG draw (`random_bits`, threefry) in a jaxpr, sub-jaxprs included."""
    return [math.prod(v.aval.shape) for eqn in jaxpr_equations(jaxpr)
            if eqn.primitive.name in ("random_bits", "threefry2x32") for v in eqn.outvars]


def test_hiccap_dropout_impl_draws_every_fusion_mask_by_hash():
    """`model.dropout_impl='hash'`: HICCAP's own dropouts (fusion blocks, projections,
    heads) draw their masks by hash: with BERT's on hash too ('flash' attention, hash hidden
    dropout), the PRNG draws only the per-layer scalar seeds, no mask. Same parameters, eval
    unchanged, other training masks."""
    base = tiny_model_config(text_len=24)
    base = base.replace(bert=dataclasses.replace(base.bert, attention_impl="flash", hidden_dropout_impl="hash"))
    hashed = base.replace(dropout_impl="hash")
    variables = init_variables(base, jax.random.key(0))
    assert jax.tree.structure(init_variables(hashed, jax.random.key(0))) == jax.tree.structure(variables)
    inputs = {k: v for k, v in random_batch(base, 3, seed=1).items() if k in MODEL_INPUTS}

    def train(config, key):
        return HICCAP(config).apply(variables, inputs, train=True, rngs={"dropout": key},
                                    mutable=["batch_stats"])[0]

    draws = {c.dropout_impl: _random_draws(jax.make_jaxpr(lambda k, c=c: train(c, k))(jax.random.key(2)).jaxpr)
             for c in (base, hashed)}
    assert max(draws["threefry"]) >= 3 * 24 * 32  # the fusion's masks (a control: the walk finds them)
    assert max(draws["hash"]) <= 2, draws["hash"]  # seeds only
    for a, b in zip(jax.tree.leaves(HICCAP(base).apply(variables, inputs)),
                    jax.tree.leaves(HICCAP(hashed).apply(variables, inputs))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out = {c.dropout_impl: train(c, jax.random.key(2)) for c in (base, hashed)}
    for t in out["hash"]:
        assert np.all(np.isfinite(np.asarray(out["hash"][t])))
    assert any(not np.allclose(np.asarray(out["hash"][t]), np.asarray(out["threefry"][t])) for t in out["hash"])
    with pytest.raises(ConfigError, match="model.dropout_impl must be one of"):
        base.replace(dropout_impl="philox")
