"""The fused attention kernels with in-kernel dropout (`attention_impl='flash'`).

CI has no GPU: the kernels run in Pallas' interpreter against the written-out reference
with the same mask, their Triton lowering is produced for CUDA on the CPU (what would fail
first on a GPU: an unsupported operation or shape), and the hash mask's statistics are
checked. The GPU run of the same comparison is `python -m mtjax.bench_attention`.
"""

import dataclasses
import re

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
    # L = 500 goes to the kernels as it is: no padded operand copies. (This form slices dq,
    # dk, dv out of the packed cotangent; BERT's packed form below slices nothing backward.)
    assert "stablehlo.pad" not in text


def test_packed_triton_lowering_for_cuda():
    """BERT's form: the backward writes one packed cotangent, the dK/dV kernel into the dQ
    kernel's output (aliased), and nothing is padded or concatenated around the kernels, nor
    reduced over the (B, L, ...) arrays: delta and the bias gradient's sums come from the kernels."""
    kvq = jax.ShapeDtypeStruct((2, 500, 3, 12, 64), jnp.bfloat16)

    def loss(kvq, bias, seed):
        return flash.flash_attention_packed(kvq, bias, seed, 0.1).astype(jnp.float32).sum()

    exported = export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=("cuda",),
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(kvq, jax.ShapeDtypeStruct((3, 12, 64), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32))
    text = exported.mlir_module()
    calls = {name: line for line in text.splitlines() for name in re.findall(r'name = "(flash_attention_\w+)"', line)}
    assert text.index(calls["flash_attention_dq"]) < text.index(calls["flash_attention_dkdv"])
    assert "output_operand_aliases" in calls["flash_attention_dkdv"]
    assert "output_operand_aliases" not in calls["flash_attention_dq"]
    assert "stablehlo.pad" not in text and "stablehlo.concatenate" not in text
    # The kernels read q, k, v where they lie in the packed projection and add the biases
    # themselves: no slices of it, no bias adds on (B, L, H, d) arrays around them.
    assert "stablehlo.slice" not in text
    assert not re.search(r"stablehlo\.add .*tensor<2x500x12x64x", text)
    # No einsum for delta, no reduction of the cotangent: only (B, n_blocks, ...) sums are reduced.
    assert "stablehlo.dot_general" not in text
    assert not re.search(r"stablehlo\.reduce\(.*tensor<2x500x", text)


def _packed(shape, seed=0):
    """A packed projection (B, L, 3, H, d) and a nonzero (3, H, d) bias."""
    b, l, h, d = shape
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (b, l, 3, h, d)), 0.5 * jax.random.normal(k2, (3, h, d))


def test_unpack_reads_the_slots_with_their_biases():
    kvq, bias = _packed((2, 9, 2, 8))
    q, k, v = flash.unpack(kvq, bias)
    np.testing.assert_array_equal(q, kvq[:, :, flash.QUERY] + bias[flash.QUERY])
    np.testing.assert_array_equal(k, kvq[:, :, flash.KEY] + bias[flash.KEY])
    np.testing.assert_array_equal(v, kvq[:, :, flash.VALUE] + bias[flash.VALUE])


@pytest.mark.parametrize("rate", [0.0, 0.1])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16)])
def test_packed_kernels_match_reference_with_biases(blocks, rate):
    # The kernels add the biases their own way (q + b_q once per row, b_v weighted by the
    # row's kept probability mass, b_k not at all): the reference adds all three to q, k, v.
    kvq, bias = _packed((2, 37, 3, 16), seed=4)
    seed = flash.seed_from_key(jax.random.key(7))
    block_q, block_k = blocks
    tiles = flash.Blocks(fwd_q=block_q, fwd_k=block_k, bwd_q=block_k, bwd_k=block_q)
    kernel = lambda kvq, bias: flash.flash_attention_packed(kvq, bias, seed, rate, tiles, True)
    reference = lambda kvq, bias: flash.attention_reference(*flash.unpack(kvq, bias), seed, rate)
    out_k, vjp_k = jax.vjp(kernel, kvq, bias)
    out_r, vjp_r = jax.vjp(reference, kvq, bias)
    np.testing.assert_allclose(out_k, out_r, atol=2e-6)
    cotangent = jax.random.normal(jax.random.key(8), out_r.shape)
    (dkvq_k, dbias_k), (dkvq_r, dbias_r) = vjp_k(cotangent), vjp_r(cotangent)
    # Every slot of the packed cotangent is written (the interpreter would leave NaN or 0 elsewhere).
    for slot in (flash.KEY, flash.VALUE, flash.QUERY):
        assert np.abs(np.asarray(dkvq_r[:, :, slot])).max() > 1e-2
        np.testing.assert_allclose(dkvq_k[:, :, slot], dkvq_r[:, :, slot], atol=3e-6)
    # The bias gradient sums 2·37 rows of the cotangent.
    np.testing.assert_allclose(dbias_k, dbias_r, atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dq_kernel_computes_delta(dtype):
    """delta = rowsum(dO ∘ O) in float32 (formerly an einsum of its own) is the dQ kernel's output."""
    q, k, v = (x.astype(dtype) for x in _qkv((2, 37, 3, 16), seed=5))
    d_out = jax.random.normal(jax.random.key(6), q.shape).astype(dtype)
    # L = 37, tiles cover 64 rows (fwd_q = 32): the dQ kernel's (16-row) tiles overhang L,
    # the last lies wholly past it, and its masked stores must leave delta's rows alone.
    blocks, rate = flash.Blocks(fwd_q=32, fwd_k=16, bwd_q=16, bwd_k=16), 0.1
    seeds = flash._batch_seeds(jnp.int32(3), q.shape[0])
    no_bias = jnp.zeros((3, *q.shape[2:]), dtype)
    out, lse, qb = flash._fwd_op(rate, blocks, True, False)(seeds, q, k, v, no_bias)
    _, delta, _, _ = flash._dq_op(rate, blocks, True, False)(seeds, qb, k, v, no_bias, d_out, lse, out)
    expected = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), d_out.astype(jnp.float32))
    # bfloat16 products are exact in float32: only the order of the 16-term sums differs.
    np.testing.assert_allclose(delta, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_bias_gradient_sums_the_cotangent_as_stored(dtype):
    """The bias gradient, summed from the kernels' per-program column sums, is the packed
    cotangent as returned (rounded to its dtype) summed over batch and length in float32."""
    kvq, bias = _packed((2, 37, 3, 16), seed=5)
    # L = 37, tiles cover 64 rows: 2 dQ tiles of 32 rows and 4 dK/dV tiles of 16, each kernel's
    # last overhanging L (the last dK/dV tile wholly past it).
    tiles = flash.Blocks(fwd_q=16, fwd_k=16, bwd_q=32, bwd_k=16)
    seed = flash.seed_from_key(jax.random.key(7))
    kernel = lambda kvq, bias: flash.flash_attention_packed(kvq, bias, seed, 0.1, tiles, True)
    out, vjp = jax.vjp(kernel, kvq.astype(dtype), bias)
    dkvq, d_bias = vjp(jax.random.normal(jax.random.key(8), out.shape).astype(dtype))
    assert dkvq.dtype == dtype and d_bias.dtype == bias.dtype
    expected = jnp.sum(dkvq.astype(jnp.float32), axis=(0, 1))
    # float32 sums of 74 terms in another order: rounding far below 1e-6 of the summed magnitudes.
    magnitude = jnp.sum(jnp.abs(dkvq.astype(jnp.float32)), axis=(0, 1))
    assert float(jnp.max(jnp.abs(d_bias - expected) / magnitude)) <= 1e-6


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


@pytest.mark.parametrize("interpret", [False, True])
def test_bert_self_attention_trains_on_the_packed_projection(monkeypatch, interpret):
    """Training with 'flash' runs one matmul on [W_k | W_v | W_q] and lets the kernels add the
    biases: the same function of the same three Dense layers' parameters, values and gradients
    (on the CPU written out, or the kernels in the interpreter)."""
    from mtjax.models.bert import BertSelfAttention

    _, with_flash = _model_configs()
    config = dataclasses.replace(with_flash.bert, attention_probs_dropout_prob=0.2)
    module = BertSelfAttention(config)
    x = jax.random.normal(jax.random.key(1), (2, 24, config.hidden_size))
    params = module.init(jax.random.key(0), x, deterministic=True)["params"]
    # Nonzero biases, so that a lost or doubled bias add shows.
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    assert sorted(params) == ["key", "query", "value"]

    seeds = []
    seed_from_key = flash.seed_from_key
    monkeypatch.setattr(flash, "seed_from_key", lambda key: seeds.append(seed_from_key(key)) or seeds[-1])
    monkeypatch.setattr(flash, "INTERPRET", interpret)
    heads, depth = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    cotangent = jax.random.normal(jax.random.key(2), x.shape)

    def packed(params):
        out = module.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(5)})
        return jnp.sum(out * cotangent)

    value, grads = jax.value_and_grad(packed)(params)
    (seed,) = set(int(s) for s in seeds)

    def three_dense(params):
        q, k, v = ((x @ params[n]["kernel"] + params[n]["bias"]).reshape(2, 24, heads, depth)
                   for n in ("query", "key", "value"))
        out = flash.attention_reference(q, k, v, jnp.int32(seed), config.attention_probs_dropout_prob)
        return jnp.sum(out.reshape(x.shape) * cotangent)

    value_r, grads_r = jax.value_and_grad(three_dense)(params)
    np.testing.assert_allclose(value, value_r, rtol=1e-5)
    g_max = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_r))
    for name in params:
        for p in ("kernel", "bias"):
            if (name, p) == ("key", "bias"):
                # It shifts every score of a row alike: its gradient is 0 in exact arithmetic,
                # rounding noise here (measured ≤ 1e-5 against g_max ~ 0.04) on both paths.
                assert float(jnp.max(jnp.abs(grads[name][p]))) <= 1e-3 * g_max
                assert float(jnp.max(jnp.abs(grads_r[name][p]))) <= 1e-3 * g_max
                continue
            scale = float(jnp.max(jnp.abs(grads_r[name][p])))
            assert scale > 1e-2 * g_max, (name, p)
            # float32; kernels: blocked online softmax, sums in another order.
            np.testing.assert_allclose(grads[name][p], grads_r[name][p], atol=2e-5 * scale, err_msg=f"{name}/{p}")
