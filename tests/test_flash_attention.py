"""The fused attention kernels with in-kernel dropout (`attention_impl='flash'`).

CI has no GPU: the kernels run in Pallas' interpreter against the written-out reference
with the same mask, their Triton lowering is produced for CUDA on the CPU (what would fail
first on a GPU: an unsupported operation or shape), and the hash mask's statistics are
checked. The GPU run of the same comparison is `python -m mtjax.bench_attention`.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from mtjax.config import ConfigError, tiny_model_config
from mtjax.models import flash_attention as flash
from mtjax.models.attention import dot_product_attention
from mtjax.models.hiccap import HICCAP, MODEL_INPUTS, init_variables
from tests._support import random_batch


def _qkv(shape, seed=0):
    return tuple(jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(seed), 3))


def _interpreted(block_q, block_k, rate, seed):
    blocks = flash.Blocks(fwd_q=block_q, fwd_k=block_k, bwd_q=block_k, bwd_k=block_q)
    return lambda q, k, v: flash.flash_attention(q, k, v, seed, rate, blocks, True)


@pytest.mark.parametrize("rate", [0.0, 0.1])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 32)])
def test_kernels_match_reference(rate, blocks):
    # L = 37 is no block multiple: the tiles overhang it, the kernels mask every load and
    # store past L (the interpreter fills the overhang with garbage), and those keys get no weight.
    q, k, v = _qkv((2, 37, 3, 16))
    seed = flash.seed_from_key(jax.random.key(7))
    kernel = _interpreted(*blocks, rate, seed)
    reference = lambda q, k, v: flash.attention_reference(q, k, v, seed, rate)
    out_k, vjp_k = jax.vjp(kernel, q, k, v)
    out_r, vjp_r = jax.vjp(reference, q, k, v)
    assert out_k.shape == q.shape
    # float32 throughout; the kernels sum in another order (online softmax, blocked dots).
    np.testing.assert_allclose(out_k, out_r, atol=2e-6)
    cotangent = jax.random.normal(jax.random.key(8), out_r.shape)
    for gk, gr in zip(vjp_k(cotangent), vjp_r(cotangent)):
        np.testing.assert_allclose(gk, gr, atol=3e-6)


def test_without_dropout_is_plain_softmax_attention():
    q, k, v = _qkv((2, 20, 2, 8), seed=1)
    plain = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)), v)
    out = _interpreted(16, 16, 0.0, jnp.int32(5))(q, k, v)
    np.testing.assert_allclose(out, plain, atol=2e-6)


def test_dropout_uses_the_mask_and_scales_kept_weights():
    # With v = identity rows (L = d), the output row is the dropped probability row itself.
    L = 16
    q, k, _ = _qkv((1, L, 1, L), seed=2)
    v = jnp.eye(L)[None, :, None, :]
    seed, rate = jnp.int32(11), 0.25
    out = _interpreted(16, 16, rate, seed)(q, k, v)[0, :, 0, :]
    probs = jax.nn.softmax(jnp.einsum("qd,kd->qk", q[0, :, 0], k[0, :, 0]) / 4.0)
    keep = flash.keep_mask(seed, 1, 1, L, L, rate)[0, 0]
    np.testing.assert_array_equal(out == 0, ~keep)
    np.testing.assert_allclose(out, jnp.where(keep, probs / (1 - rate), 0), atol=1e-6)


def test_vmapped_backward_is_the_per_cotangent_backward():
    # train_step's per-task gradients vmap the VJP: the kernels fold that axis into the batch.
    q, k, v = _qkv((2, 20, 2, 8), seed=3)
    _, vjp = jax.vjp(_interpreted(16, 16, 0.1, jnp.int32(4)), q, k, v)
    cotangents = jax.random.normal(jax.random.key(9), (3, *q.shape))
    batched = jax.jit(jax.vmap(vjp))(cotangents)
    for t in range(3):
        for got, want in zip(batched, jax.jit(vjp)(cotangents[t])):
            np.testing.assert_allclose(got[t], want, atol=1e-6)


def test_mask_statistics():
    rate = 0.1
    a = np.asarray(flash.keep_mask(jnp.int32(1), 8, 12, 128, 128, rate))
    b = np.asarray(flash.keep_mask(jnp.int32(2), 8, 12, 128, 128, rate))
    n = a.size
    # keep rate within 5 standard deviations of 1 − rate
    assert abs(a.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
    # seeds, heads, rows and neighbouring columns are independent: agreement ≈ p² + (1−p)²
    independent = (1 - rate) ** 2 + rate ** 2
    tol = 5 * np.sqrt(independent * (1 - independent) / (n / 2))
    for x, y in [(a, b), (a[:, :6], a[:, 6:]), (a[:, :, ::2], a[:, :, 1::2]), (a[..., :-1], a[..., 1:])]:
        assert abs((x == y).mean() - independent) < tol


def test_triton_lowering_for_cuda():
    """The forward and both backward kernels lower to Triton for a CUDA target (checked on
    the CPU: this is where an operation Pallas' Triton backend lacks would fail)."""
    q = jax.ShapeDtypeStruct((2, 500, 12, 64), jnp.bfloat16)

    def loss(q, k, v, seed):
        return flash.flash_attention(q, k, v, seed, 0.1).astype(jnp.float32).sum()

    exported = export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=("cuda",),
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(q, q, q, jax.ShapeDtypeStruct((), jnp.int32))
    text = exported.mlir_module()
    for name in ("flash_attention_fwd", "flash_attention_dkdv", "flash_attention_dq"):
        assert f'name = "{name}"' in text
    # L = 500 goes to the kernels as it is: no padded operand copies, no sliced results.
    assert "stablehlo.pad" not in text and "stablehlo.slice" not in text


def _model_configs():
    base = tiny_model_config(text_len=24)
    with_flash = base.replace(bert=dataclasses.replace(base.bert, attention_impl="flash"))
    return base, with_flash


def test_model_eval_is_unchanged_and_training_draws_fresh_masks():
    base, with_flash = _model_configs()
    variables = init_variables(base, jax.random.PRNGKey(0))
    inputs = {k: v for k, v in random_batch(base, 3, seed=1).items() if k in MODEL_INPUTS}
    eval_xla = HICCAP(base).apply(variables, inputs, train=False)
    eval_flash = HICCAP(with_flash).apply(variables, inputs, train=False)
    for t in eval_xla:
        np.testing.assert_allclose(eval_flash[t], eval_xla[t], atol=1e-6)

    def train_probs(key):
        probs, _ = HICCAP(with_flash).apply(variables, inputs, train=True, rngs={"dropout": key},
                                            mutable=["batch_stats"])
        return probs

    first, again, other = train_probs(jax.random.key(1)), train_probs(jax.random.key(1)), train_probs(jax.random.key(2))
    t = base.tasks[0]
    np.testing.assert_array_equal(first[t], again[t])
    assert not np.allclose(first[t], other[t])


def test_flash_refuses_what_it_does_not_compute():
    q, k, v = _qkv((1, 8, 2, 4))
    with pytest.raises(ValueError, match="without an attention bias"):
        dot_product_attention(q, k, v, bias=jnp.zeros((1, 1, 1, 8)), dropout=nn.Dropout(0.1),
                              deterministic=True, implementation="flash")
    with pytest.raises(ConfigError, match="attention_impl"):
        dataclasses.replace(tiny_model_config().bert, attention_impl="flashy")
