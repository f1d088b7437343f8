"""Scaled dot-product attention and the Dense layer shared by BERT and the fusion."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from mtjax.models import flash_attention as flash

# cuDNN's fused attention takes half-precision operands only.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


@jax.custom_vjp
def _add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
    return _add_bias(y, bias), None


def _add_bias_bwd(_, g):
    # The bias gradient sums the cotangent over every batch and sequence position
    # (16k rows for BERT at batch 32): accumulate it in float32, not in bf16.
    return g, jnp.sum(g.astype(jnp.float32), axis=tuple(range(g.ndim - 1)))


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def add_dense_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """`Dense`'s bias add: in y's dtype; below the bias's dtype its gradient sums in float32."""
    return y + bias.astype(y.dtype) if y.dtype == bias.dtype else _add_bias(y, bias)


def dense_matmul(inputs: jax.Array, kernel: jax.Array, dtype, precision=None) -> jax.Array:
    """`Dense`'s matmul (no bias): inputs (..., in) · kernel (in, out), both cast to `dtype`."""
    return jax.lax.dot_general(inputs.astype(dtype), kernel.astype(dtype),
                               (((inputs.ndim - 1,), (0,)), ((), ())), precision=precision)


class Dense(nn.Dense):
    """`nn.Dense` (same parameters, same forward) whose bias gradient accumulates in
    float32 when the compute dtype is lower; identical to `nn.Dense` in float32."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        dtype = jnp.dtype(self.dtype or jnp.result_type(inputs, kernel))
        y = dense_matmul(inputs, kernel, dtype, self.precision)
        return y if bias is None else add_dense_bias(y, bias)


class DenseParams(nn.Dense):
    """`Dense`'s parameters alone (same names, shapes and initialisers), for a caller that
    does the matmul itself and lets a kernel add the bias. Returns (kernel, bias)."""

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        return (self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype),
                self.param("bias", self.bias_init, (self.features,), self.param_dtype))


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, L, d) -> (B, L, H, d/H)."""
    b, l, d = x.shape
    return x.reshape(b, l, num_heads, d // num_heads)


def use_cudnn(implementation: str, q: jax.Array, dropout: nn.Dropout, deterministic: bool) -> bool:
    """Whether the fused kernel computes exactly this attention: it has no dropout on the
    probabilities, runs on NVIDIA GPUs only and takes bf16/fp16 operands."""
    return (implementation == "cudnn" and (deterministic or dropout.rate == 0.0)
            and q.dtype in _CUDNN_DTYPES and jax.default_backend() == "gpu")


def use_flash_kernel(q: jax.Array) -> bool:
    """Whether 'flash' runs fused kernels (ours with dropout, cuDNN's without): NVIDIA GPU and
    half-precision operands (the kernels' matmuls would run fp32 operands in TF32)."""
    return q.dtype in _CUDNN_DTYPES and jax.default_backend() == "gpu"


def _flash(q, k, v, bias, rate: float, dropout_rng: jax.Array | None) -> jax.Array:
    """The 'flash' path: self-attention without bias; dropout drawn by hash from `dropout_rng`."""
    if bias is not None or q.shape != k.shape:
        raise ValueError("attention_impl='flash' supports self-attention without an attention bias "
                         f"(got q {q.shape}, k {k.shape}, bias {None if bias is None else bias.shape})")
    if dropout_rng is None or rate == 0.0:
        if use_flash_kernel(q):  # no mask to draw: cuDNN's kernel is the same function, and faster
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        return flash.attention_reference(q, k, v, jnp.zeros((), jnp.int32), 0.0)
    seed = flash.seed_from_key(dropout_rng)
    if use_flash_kernel(q):
        return flash.flash_attention(q, k, v, seed, rate)
    return flash.attention_reference(q, k, v, seed, rate)


def packed_self_attention(kvq: jax.Array, bias: jax.Array, seed: jax.Array, rate: float) -> jax.Array:
    """The 'flash' path with dropout on BERT's packed projection: kvq (B, L, 3, H, d) before
    its (3, H, d) bias (slots `flash.KEY/VALUE/QUERY`); returns (B, L, H, d). The fused
    kernels where they run (or in the interpreter, `flash.INTERPRET`), else the same function
    written out with `Dense`'s bias adds."""
    if flash.INTERPRET or use_flash_kernel(kvq):
        return flash.flash_attention_packed(kvq, bias, seed, rate, interpret=flash.INTERPRET)
    q, k, v = (add_dense_bias(kvq[:, :, slot], bias[slot]) for slot in (flash.QUERY, flash.KEY, flash.VALUE))
    return flash.attention_reference(q, k, v, seed, rate)


def _softmax_dropout_values(scores: jax.Array, v: jax.Array, key: jax.Array | None, rate: float) -> jax.Array:
    """softmax(scores) → dropout (as `nn.Dropout`: keep with 1−rate, scale by 1/(1−rate)) → · v."""
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if key is not None:
        keep_prob = 1.0 - rate
        keep = jax.random.bernoulli(key, p=keep_prob, shape=probs.shape)
        probs = jax.lax.select(keep, probs / keep_prob, jnp.zeros_like(probs))
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


# The backward pass recomputes the softmax, the mask and the dropped probabilities from
# the saved scores instead of keeping all three (elementwise work, no matmul).
_softmax_dropout_values_remat = jax.checkpoint(_softmax_dropout_values, static_argnums=(3,))


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: jax.Array | None,
    dropout: nn.Dropout,
    deterministic: bool,
    implementation: str = "xla",
    remat_probs: bool = False,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """softmax(q·kᵀ/√dₕ + bias) · v over heads laid out (B, L, H, dₕ); returns (B, Lq, H·dₕ).

    `bias` broadcasts to (B, H, Lq, Lk). The 'xla' path is written out because both BERT
    and the fusion put dropout on the attention probabilities, which the fused kernels do
    not offer; its softmax statistics run in float32 whatever the compute dtype.
    `implementation='cudnn'` switches to cuDNN's fused attention where `use_cudnn` allows
    (its softmax also accumulates in float32) and silently keeps the 'xla' path elsewhere.
    `remat_probs` selects the 'xla' path that recomputes the probabilities in the backward
    pass (`BertConfig.remat_attention_probs`); it draws its dropout mask from `dropout_rng`
    (None: no dropout), not from the `dropout` module. `implementation='flash'` (self-attention
    without bias) draws its mask by hash from `dropout_rng` (None: no dropout) and runs the
    fused Pallas kernels where `use_flash_kernel` allows, the same function written out elsewhere.
    """
    b, lq, h, dh = q.shape
    if implementation == "flash":
        return _flash(q, k, v, bias, dropout.rate, dropout_rng).reshape(b, lq, h * dh)
    if use_cudnn(implementation, q, dropout, deterministic):
        if bias is not None:
            # cuDNN wants a full (.., Lq, Lk) bias in the operand dtype; the −10000 mask
            # value rounds in bf16 but still underflows exp() to exactly 0, as in fp32.
            bias = jnp.broadcast_to(bias, (bias.shape[0], 1, lq, k.shape[1])).astype(q.dtype)
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")
        return out.reshape(b, lq, h * dh)
    depth = q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(depth, q.dtype))
    scores = scores.astype(jnp.float32)
    if bias is not None:
        scores = scores + bias
    if remat_probs:
        out = _softmax_dropout_values_remat(scores, v, dropout_rng, dropout.rate)
        return out.reshape(b, lq, h * dh)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    probs = dropout(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(b, lq, h * dh)
