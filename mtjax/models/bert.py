"""FlaxBert: Hugging Face `BertModel`'s encoder (post-LN, exact-erf GELU) in Flax.

Submodule names follow the HF state dict (`embeddings.word_embeddings`,
`encoder.layer.{i}.attention.self.query`, ...) so conversion is a table of renames.
HICCAP calls BERT with token ids only: token types are all 0, positions are 0..L-1 and
nothing is masked, so the left padding is attended to (SPEC §2.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from mtjax.config import BertConfig
from mtjax.models import fused_add_norm
from mtjax.models import flash_attention as flash
from mtjax.models.attention import (Dense, DenseParams, dense_matmul, dot_product_attention, packed_self_attention,
                                    split_heads)
from mtjax.models.dropout import Dropout


# "erf": x·½(1 + erf(x/√2)), PyTorch's own formula for exact GELU; "erfc": jax.nn.gelu's
# ½x·erfc(−x/√2). Same function; on the GPU erf is a short polynomial where erfc needs an
# exp and a wider approximation, and this activation runs over (B, 500, 3072) per layer.
GELU_IMPL = "erf"


def exact_gelu(x: jax.Array) -> jax.Array:
    if GELU_IMPL == "erfc":
        return jax.nn.gelu(x, approximate=False)
    xf = x.astype(jnp.float32)  # erf in float32 whatever the compute dtype (XLA would upcast anyway)
    return (xf * 0.5 * (1.0 + jax.lax.erf(xf * (2.0 ** -0.5)))).astype(x.dtype)


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, *, deterministic: bool) -> jax.Array:
        c = self.config
        seq_len = input_ids.shape[1]
        words = nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
        if c.pad_token_id is not None:
            # PyTorch's `padding_idx`: the [PAD] row is used but never trained.
            is_pad = (input_ids == c.pad_token_id)[..., None]
            words = jnp.where(is_pad, jax.lax.stop_gradient(words), words)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(
            jnp.arange(seq_len)[None, :])
        # Every token is of type 0: row 0, broadcast (its gradient is then a sum, where a
        # lookup per token would scatter-add B·L rows into that one row).
        token_types = nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
            jnp.zeros((1, 1), jnp.int32))
        x = words + positions + token_types
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x)
        x = Dropout(c.hidden_dropout_prob, impl=c.hidden_dropout_impl)(x, deterministic=deterministic)
        return x.astype(self.dtype)


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        c = self.config
        if c.attention_impl == "flash" and not deterministic and c.attention_probs_dropout_prob > 0:
            return self._packed_flash(x)
        dense = lambda name: Dense(c.hidden_size, dtype=self.dtype, name=name)
        q = split_heads(dense("query")(x), c.num_attention_heads)
        k = split_heads(dense("key")(x), c.num_attention_heads)
        v = split_heads(dense("value")(x), c.num_attention_heads)
        dropout = nn.Dropout(c.attention_probs_dropout_prob)
        dropout_active = not deterministic and dropout.rate > 0
        # The remat and flash paths draw their own masks from a key; the others use `dropout`.
        own_mask = c.remat_attention_probs or c.attention_impl == "flash"
        mask_rng = self.make_rng("dropout") if own_mask and dropout_active else None
        return dot_product_attention(q, k, v, bias=None, dropout=dropout, deterministic=deterministic,
                                     implementation=c.attention_impl, remat_probs=c.remat_attention_probs,
                                     dropout_rng=mask_rng)

    def _packed_flash(self, x: jax.Array) -> jax.Array:
        """Training with 'flash': one matmul x·[W_k | W_v | W_q] (the three Dense layers'
        parameters) whose packed cotangent the kernels write (flash_attention.py)."""
        c = self.config
        b, l, _ = x.shape
        heads, depth = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        names = {flash.KEY: "key", flash.VALUE: "value", flash.QUERY: "query"}
        params = [DenseParams(c.hidden_size, name=names[slot])(x.shape[-1]) for slot in sorted(names)]
        # The three kernels concatenated and cast once, behind a barrier: otherwise XLA casts
        # each on its own and concatenates them twice (for the forward matmul and again for
        # the backward's input gradient), five small kernels per layer instead of one.
        kernel = jax.lax.optimization_barrier(jnp.concatenate([k for k, _ in params], axis=1).astype(self.dtype))
        kvq = dense_matmul(x, kernel, self.dtype)
        bias = jnp.stack([bias for _, bias in params]).reshape(3, heads, depth)
        seed = flash.seed_from_key(self.make_rng("dropout"))
        out = packed_self_attention(kvq.reshape(b, l, 3, heads, depth), bias, seed,
                                    c.attention_probs_dropout_prob)
        return out.reshape(b, l, c.hidden_size)


Pair = tuple[jax.Array, jax.Array]


class BertAddNorm(nn.Module):
    """Dense → dropout → LayerNorm(· + residual): HF's BertSelfOutput and BertOutput.

    `fork=True` returns the output as a pair (for the following matmul, for the next add-norm's
    residual): the fused kernels then get the two uses' cotangents separately and add them in
    their backward, saving XLA's pass that would sum them (fused_add_norm's docstring). Written
    out, the pair is the same array twice."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, *, deterministic: bool,
                 fork: bool = False) -> jax.Array | Pair:
        c = self.config
        # The dense output's dtype as `Dense` computes it (module dtype, else the inputs' with the
        # float32 kernel's): the kernels' decision is taken before either path makes the parameters.
        dense_dtype = jnp.dtype(self.dtype or jnp.result_type(x, jnp.float32))
        dense_out = jax.ShapeDtypeStruct((*x.shape[:-1], c.hidden_size), dense_dtype)
        if c.add_norm_impl == "fused" and fused_add_norm.use_fused_kernels(dense_out):
            # Dense's matmul; the kernel adds its bias (saving an XLA pass each way).
            kernel, dense_bias = DenseParams(c.hidden_size, name="dense")(x.shape[-1])
            y = dense_matmul(x, kernel, dense_dtype)
            rate = 0.0 if deterministic else c.hidden_dropout_prob
            dropout = Dropout(c.hidden_dropout_prob, impl=c.hidden_dropout_impl)
            seed = dropout.hash_seed() if rate > 0 else jnp.int32(0)
            scale, bias = LayerNormParams(name="LayerNorm")(c.hidden_size)
            return fused_add_norm.add_dropout_layer_norm(y, dense_bias, residual.astype(y.dtype), scale, bias, seed,
                                                         rate, c.layer_norm_eps, fused_add_norm.INTERPRET, fork)
        x = Dense(c.hidden_size, dtype=self.dtype, name="dense")(x)
        dropout = Dropout(c.hidden_dropout_prob, impl=c.hidden_dropout_impl)
        x = dropout(x, deterministic=deterministic)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x + residual)
        x = x.astype(self.dtype)
        return (x, x) if fork else x


class LayerNormParams(nn.Module):
    """nn.LayerNorm's parameters alone (same names, shapes and initialisers), for a kernel
    that computes the normalisation itself."""

    @nn.compact
    def __call__(self, width: int) -> tuple[jax.Array, jax.Array]:
        return (self.param("scale", nn.initializers.ones, (width,), jnp.float32),
                self.param("bias", nn.initializers.zeros, (width,), jnp.float32))


class BertAttentionBlock(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.self = BertSelfAttention(self.config, self.dtype)
        self.output = BertAddNorm(self.config, self.dtype)

    def __call__(self, x: Pair, *, deterministic: bool) -> Pair:
        """x: (for the q/k/v matmul, as the residual), the same values; returns such a pair."""
        to_matmul, to_residual = x
        return self.output(self.self(to_matmul, deterministic=deterministic), to_residual,
                           deterministic=deterministic, fork=True)


class BertIntermediate(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return exact_gelu(Dense(self.config.intermediate_size, dtype=self.dtype, name="dense")(x))


class BertLayer(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.attention = BertAttentionBlock(self.config, self.dtype)
        self.intermediate = BertIntermediate(self.config, self.dtype)
        self.output = BertAddNorm(self.config, self.dtype)

    def __call__(self, x: jax.Array | Pair, *, deterministic: bool, fork: bool = False) -> jax.Array | Pair:
        """x: one array or a pair (for the q/k/v matmul, as the residual) of the same values;
        returns one array, or such a pair with fork=True (BertEncoder)."""
        x = x if isinstance(x, tuple) else (x, x)
        to_matmul, to_residual = self.attention(x, deterministic=deterministic)
        return self.output(self.intermediate(to_matmul), to_residual, deterministic=deterministic, fork=fork)


class BertEncoder(nn.Module):
    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        # `layer_{i}` in Flax ↔ `layer.{i}` in the HF state dict.
        self.layer = [BertLayer(self.config, self.dtype, name=f"layer_{i}")
                      for i in range(self.config.num_hidden_layers)]

    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        # Each add-norm's output goes on as a pair: one copy to the next matmul, one as the next
        # add-norm's residual (BertAddNorm). The last layer's output is one array.
        for i, layer in enumerate(self.layer):
            x = layer(x, deterministic=deterministic, fork=i < len(self.layer) - 1)
        return x


class FlaxBert(nn.Module):
    """Token ids (B, L) → last hidden state (B, L, d). No pooler: HICCAP never uses it."""

    config: BertConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embeddings = BertEmbeddings(self.config, self.dtype)
        self.encoder = BertEncoder(self.config, self.dtype)

    def __call__(self, input_ids: jax.Array, *, deterministic: bool = True) -> jax.Array:
        return self.encoder(self.embeddings(input_ids, deterministic=deterministic),
                            deterministic=deterministic)
