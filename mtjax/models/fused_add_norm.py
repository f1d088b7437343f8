"""BERT's add-norm — dense bias, dropout, residual add, LayerNorm — as one kernel pass forward and one backward.

Written out, XLA runs the add-norm as several passes over the (B, L, 768) activations
forward (dropout + add, the LayerNorm statistics, the normalisation, transposed copies) and
more backward; 24 add-norms a step make it one of the largest elementwise costs of the bf16
train step. These Pallas (Triton) kernels read each row once: the forward reads the dense
layer's matmul output and the residual, adds the dense bias, and writes the output, the
pre-norm sum and the row statistics; the backward reads the output cotangent and the
pre-norm sum and writes both input cotangents and per-program partial sums of the LayerNorm
parameter gradients and of the dense bias gradient (XLA adds those up). Adding the dense bias
here saves the separate XLA pass over the matmul output forward and its column reduction
backward.

The dropout mask is `dropout.hash_keep` of each element's (row, feature) with the seed of
the `Dropout(impl='hash')` module it replaces, so the kernels draw the very mask that module
would, and the arithmetic follows the written-out path's roundings (the dense bias added in
the activation dtype as `attention.Dense` adds it, the kept value divided by the keep
probability in that dtype, the sum rounded to it, float32 statistics, the dense bias
gradient summed in float32). `add_norm_reference` is that written-out function.

Each program loops over `blocks` blocks of `rows` rows of one example (`Launch`; a tile of
rows × 1024: the 768 features as one 1024-wide tile with the columns past 768 masked, as the
rows past L are). What does not depend on the row — the column keys of the mask, the LayerNorm
scale and bias, the dense bias — it computes or loads once for all its blocks, and the backward
sums its blocks' parameter gradients in float32 across the loop, so the partial sums XLA
reduces are (B, ⌈L / (rows · blocks)⌉, 3, D): one reduction for the three gradients. The
forward and the backward have launch settings of their own (`FORWARD`, `BACKWARD`). The
per-feature operands are (D,), not broadcast over the batch (`batch_parallel` replicates
them). The loop is a `fori_loop` (Triton's scf.for), not unrolled: one block's tile is live
at a time, and the code does not grow with the blocks per program.

`forked=True` returns the output twice, for its two uses in BERT (the next matmul and the next
add-norm's residual). Returned once, JAX's autodiff sums the two uses' cotangents with an
`add_any` before the backward: on the GPU a separate XLA pass over (B, L, 768) per add-norm (23
in a train step) that writes the sum the backward kernel then reads. Forked, each use has its
own cotangent and the backward kernel loads both and adds them itself, rounded as `add_any`
rounds (added in float32, rounded to the activation dtype). Not forked, the backward loads one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mtjax.models.attention import add_dense_bias
from mtjax.models.batch_parallel import batch_parallel
from mtjax.models.dropout import column_key, hash_keep, hash_keep_mask, hash_keys, row_key


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel's launch settings (powers of two, as Triton's tiles are)."""

    rows: int       # rows per block: the tile one loop step works on
    blocks: int     # blocks each program loops over: rows · blocks rows per program
    warps: int = 4

    def __str__(self) -> str:
        return f"{self.rows}x{self.blocks}x{self.warps}"


# Module-level so that `mtjax.bench_add_norm` can sweep them. The fastest settings of a sweep
# of the kernels' profiled GPU time on an H100 at BERT-base shape (B 32, L 500, D 768,
# docs/perf_notes.md change 62): small tiles, many programs.
FORWARD = Launch(rows=4, blocks=8)
BACKWARD = Launch(rows=2, blocks=16)
# The backward's partial sums, in the order of their rows.
PARTIAL_SUMS = ("layer_norm_scale", "layer_norm_bias", "dense_bias")
# Run the kernels in Pallas' interpreter (tests that drive the model path on the CPU).
INTERPRET = False


def use_fused_kernels(x: jax.Array | jax.ShapeDtypeStruct) -> bool:
    """Whether the kernels run on the dense output `x` (BertAddNorm passes its shape and dtype,
    before it computes it): on GPUs (Triton); elsewhere the model writes the add-norm out."""
    return jax.default_backend() == "gpu"


def _keep_prob(rate: float, dtype) -> float:
    """1 − rate as the written-out path divides by it: rounded to the activation dtype."""
    return float(np.asarray(1.0 - rate, dtype))


def add_norm_reference(y, dense_bias, residual, scale, bias, seed, rate: float, eps: float):
    """LayerNorm(dropout(y + dense_bias) + residual) written out, as BertAddNorm computes it
    with `hidden_dropout_impl='hash'` (the bias added in y's dtype as `Dense` adds it,
    statistics in float32, output in y's dtype)."""
    y = add_dense_bias(y, dense_bias)  # Dense's own: its gradient summed in float32 in bf16 too
    if rate > 0:
        keep = hash_keep_mask(seed, y.shape, rate)
        y = lax.select(keep, y / jnp.asarray(1.0 - rate, y.dtype), jnp.zeros_like(y))
    s = (y + residual).astype(jnp.float32)
    mean = jnp.mean(s, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(s - mean), axis=-1, keepdims=True)
    return ((s - mean) * lax.rsqrt(var + eps) * scale + bias).astype(y.dtype)


# --------------------------------------------------------------------------- kernels

def _columns(width, block_cols):
    cols = jnp.arange(block_cols, dtype=jnp.int32)
    return cols, cols < width


def _tile(j, first_row, rows, seq_len, col_ok):
    """The program's block j: its slice of the program's rows, its rows' indices in the
    example, which of them lie in the sequence, and its tile's mask."""
    row = first_row + j * rows + jnp.arange(rows, dtype=jnp.int32)
    row_ok = row < seq_len
    return pl.ds(j * rows, rows), row, row_ok, row_ok[:, None] & col_ok[None, :]


def _keep_fn(base_ref, seed_ref, cols, rate):
    """keep(row) -> a block's mask: its rows' keys (global row index: the example's first row
    + the row) against the columns' keys, as `hash_keep_mask` draws it on (B, L, D). The seed's
    keys and the column keys are hashed here, once for all the program's blocks."""
    base, keys, col_keys = base_ref[0], hash_keys(seed_ref[0]), column_key(cols)[None, :]
    return lambda row: hash_keep(row_key(base + row, *keys)[:, None], col_keys, rate)


def _fwd_kernel(base_ref, seed_ref, y_ref, y_bias_ref, r_ref, scale_ref, bias_ref,
                out_ref, s_ref, mean_ref, rstd_ref, *, rate, keep_prob, eps, rows, blocks, seq_len, width,
                block_cols):
    cols, col_ok = _columns(width, block_cols)
    first_row = pl.program_id(0) * (rows * blocks)
    dtype = y_ref.dtype
    # Per program: the per-feature operands and the column keys, shared by its blocks.
    # Dense's bias add: the bias rounded to the activation dtype (the sum rounded to it below).
    y_bias = plgpu.load(y_bias_ref, mask=col_ok, other=0).astype(dtype).astype(jnp.float32)
    scale = plgpu.load(scale_ref, mask=col_ok, other=0)
    bias = plgpu.load(bias_ref, mask=col_ok, other=0)
    keep = _keep_fn(base_ref, seed_ref, cols, rate) if rate > 0 else None

    def block(j, carry):
        block_rows, row, row_ok, ok = _tile(j, first_row, rows, seq_len, col_ok)
        y = plgpu.load(y_ref.at[block_rows, :], mask=ok, other=0)
        r = plgpu.load(r_ref.at[block_rows, :], mask=ok, other=0)
        y = (y.astype(jnp.float32) + y_bias[None, :]).astype(dtype)
        if rate > 0:
            dropped = (y.astype(jnp.float32) / keep_prob).astype(dtype)
            y = jnp.where(keep(row), dropped, jnp.zeros_like(dropped))
        s = (y.astype(jnp.float32) + r.astype(jnp.float32)).astype(dtype)
        s32 = s.astype(jnp.float32)
        mean = jnp.sum(s32, axis=1) / width
        centred = jnp.where(ok, s32 - mean[:, None], 0.0)
        rstd = lax.rsqrt(jnp.sum(centred * centred, axis=1) / width + eps)
        out = centred * rstd[:, None] * scale[None, :] + bias[None, :]
        plgpu.store(out_ref.at[block_rows, :], out.astype(out_ref.dtype), mask=ok)
        plgpu.store(s_ref.at[block_rows, :], s, mask=ok)
        plgpu.store(mean_ref.at[block_rows], mean, mask=row_ok)
        plgpu.store(rstd_ref.at[block_rows], rstd, mask=row_ok)
        return carry

    lax.fori_loop(0, blocks, block, ())


def _bwd_kernel(base_ref, seed_ref, dout_ref, dout2_ref, s_ref, mean_ref, rstd_ref, scale_ref,
                dy_ref, dr_ref, sums_ref, *, rate, keep_prob, rows, blocks, seq_len,
                width, block_cols):
    """dout2_ref: the forked output's second cotangent, or None (not forked). sums_ref: the
    program's partial sums of the LayerNorm scale, LayerNorm bias and dense bias gradients,
    stacked (rows `PARTIAL_SUMS`), so that XLA adds them all up in one reduction."""
    cols, col_ok = _columns(width, block_cols)
    first_row = pl.program_id(0) * (rows * blocks)
    dtype = dy_ref.dtype
    scale = plgpu.load(scale_ref, mask=col_ok, other=0)
    keep = _keep_fn(base_ref, seed_ref, cols, rate) if rate > 0 else None

    def block(j, sums):
        block_rows, row, row_ok, ok = _tile(j, first_row, rows, seq_len, col_ok)
        dout = plgpu.load(dout_ref.at[block_rows, :], mask=ok, other=0).astype(jnp.float32)
        if dout2_ref is not None:
            # The two uses' cotangents summed as add_any sums them: in float32, rounded to their dtype.
            dout2 = plgpu.load(dout2_ref.at[block_rows, :], mask=ok, other=0).astype(jnp.float32)
            dout = (dout + dout2).astype(dtype).astype(jnp.float32)
        s = plgpu.load(s_ref.at[block_rows, :], mask=ok, other=0).astype(jnp.float32)
        mean = plgpu.load(mean_ref.at[block_rows], mask=row_ok, other=0)
        rstd = plgpu.load(rstd_ref.at[block_rows], mask=row_ok, other=0)
        xhat = jnp.where(ok, (s - mean[:, None]) * rstd[:, None], 0.0)
        g = dout * scale[None, :]
        mean_g = jnp.sum(g, axis=1) / width
        mean_gx = jnp.sum(g * xhat, axis=1) / width
        ds = (rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])).astype(dtype)
        plgpu.store(dr_ref.at[block_rows, :], ds, mask=ok)
        if rate > 0:
            dropped = (ds.astype(jnp.float32) / keep_prob).astype(dtype)
            dy = jnp.where(keep(row), dropped, jnp.zeros_like(dropped))
        else:
            dy = ds
        plgpu.store(dy_ref.at[block_rows, :], dy, mask=ok)
        dscale, dbias, dy_bias = sums
        # The dense bias gradient sums dy as stored (rounded to its dtype) in float32, as Dense's
        # does; the rows past L add 0 (their dout is loaded as 0, so ds is 0).
        return (dscale + jnp.sum(dout * xhat, axis=0), dbias + jnp.sum(dout, axis=0),
                dy_bias + jnp.sum(dy.astype(jnp.float32), axis=0))

    # The parameter gradients' partial sums over the program's rows, in float32, stored once.
    zeros = jnp.zeros((block_cols,), jnp.float32)
    for row, total in enumerate(lax.fori_loop(0, blocks, block, (zeros, zeros, zeros))):
        plgpu.store(sums_ref.at[pl.ds(row, 1), :], total[None, :], mask=col_ok[None, :])


# --------------------------------------------------------------------------- wrappers

class _Plan:
    """Block specs and grid for (B, L, D) operands of any (local) batch size: one program per
    `launch.blocks` · `launch.rows` rows of one example (the last one's rows past L masked);
    the feature axis as one tile of the next power of two."""

    def __init__(self, shape, interpret: bool, launch: Launch):
        self.batch, self.seq_len, self.width = shape
        self.block_cols = 1 << (self.width - 1).bit_length()
        self.program_rows = launch.rows * launch.blocks
        self.programs = -(-self.seq_len // self.program_rows)  # per example
        self.grid = (self.programs, self.batch)
        params = None if interpret else plgpu.CompilerParams(num_warps=launch.warps, num_stages=1)
        self.call_args = dict(compiler_params=params, interpret=interpret)
        self.common = dict(rows=launch.rows, blocks=launch.blocks, seq_len=self.seq_len, width=self.width,
                           block_cols=self.block_cols)

    def rows(self):
        return pl.BlockSpec((None, self.program_rows, self.block_cols), lambda i, b: (b, i, 0))

    def stats(self):
        return pl.BlockSpec((None, self.program_rows), lambda i, b: (b, i))

    def features(self):
        """A per-feature parameter (D,): the same for every example."""
        return pl.BlockSpec((self.block_cols,), lambda i, b: (0,))

    def partial_sums(self):
        """(B, programs, 3, D): each program's three partial sums (a tile of 4 rows, as Triton's
        tiles are powers of two; the fourth is never stored)."""
        return pl.BlockSpec((None, None, 4, self.block_cols), lambda i, b: (b, i, 0, 0))


_EXAMPLE = pl.BlockSpec((1,), lambda i, b: (b,))  # the example's index base and seed


@functools.lru_cache(maxsize=None)
def _fwd_op(rate: float, eps: float, interpret: bool):
    def call(base, seeds, y, y_bias, r, scale, bias):
        plan = _Plan(y.shape, interpret, FORWARD)
        b, l, _ = y.shape
        return tuple(pl.pallas_call(
            functools.partial(_fwd_kernel, rate=rate, keep_prob=_keep_prob(rate, y.dtype), eps=eps, **plan.common),
            grid=plan.grid,
            in_specs=[_EXAMPLE, _EXAMPLE, plan.rows(), plan.features(), plan.rows(), plan.features(),
                      plan.features()],
            out_specs=[plan.rows(), plan.rows(), plan.stats(), plan.stats()],
            out_shape=[jax.ShapeDtypeStruct(y.shape, y.dtype), jax.ShapeDtypeStruct(y.shape, y.dtype),
                       jax.ShapeDtypeStruct((b, l), jnp.float32), jax.ShapeDtypeStruct((b, l), jnp.float32)],
            name="add_norm_fwd", **plan.call_args,
        )(base, seeds, y, y_bias, r, scale, bias))

    return batch_parallel(call, "b, b, b l d, d, b l d, d, d -> b l d, b l d, b l, b l")


@functools.lru_cache(maxsize=None)
def _bwd_op(rate: float, interpret: bool, forked: bool = False):
    """Operands (base, seeds, dout, [dout2 if forked,] s, mean, rstd, scale)."""
    douts = 2 if forked else 1

    def call(base, seeds, *operands):
        s = operands[douts]
        plan = _Plan(s.shape, interpret, BACKWARD)
        b, _, d = s.shape
        partial_sums = jax.ShapeDtypeStruct((b, plan.programs, len(PARTIAL_SUMS), d), jnp.float32)
        kernel = functools.partial(_bwd_kernel, rate=rate, keep_prob=_keep_prob(rate, s.dtype), **plan.common)
        if not forked:  # no second cotangent ref: the kernel loads one
            kernel = functools.partial(_one_cotangent, kernel)
        return tuple(pl.pallas_call(
            kernel,
            grid=plan.grid,
            in_specs=[_EXAMPLE, _EXAMPLE, *[plan.rows()] * douts, plan.rows(), plan.stats(), plan.stats(),
                      plan.features()],
            out_specs=[plan.rows(), plan.rows(), plan.partial_sums()],
            out_shape=[jax.ShapeDtypeStruct(s.shape, s.dtype), jax.ShapeDtypeStruct(s.shape, s.dtype), partial_sums],
            name="add_norm_bwd", **plan.call_args,
        )(base, seeds, *operands))

    ins = "b, b, " + "b l d, " * douts + "b l d, b l, b l, d"
    return batch_parallel(call, ins + " -> b l d, b l d, b k p d")


def _one_cotangent(kernel, base_ref, seed_ref, dout_ref, *refs):
    return kernel(base_ref, seed_ref, dout_ref, None, *refs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def add_dropout_layer_norm(y, dense_bias, residual, scale, bias, seed, rate: float, eps: float,
                           interpret: bool = False, forked: bool = False):
    """LayerNorm(dropout(y + dense_bias) + residual) · scale + bias, fused; `add_norm_reference`
    written out.

    y: the dense layer's matmul output before its bias, residual: (B, L, D) of one dtype;
    dense_bias (the dense layer's), scale, bias: (D,) float32; seed: int32 scalar (the 'hash'
    dropout seed, `Dropout.hash_seed`); rate 0 for no dropout. Returns y's dtype. y's cotangent
    is also that of y + dense_bias. `interpret=True` runs the kernels in Pallas' interpreter
    (CPU tests). `forked=True` returns the output twice, (out, out), for two uses whose
    cotangents the backward kernel adds (module docstring)."""
    return _fwd(y, dense_bias, residual, scale, bias, seed, rate, eps, interpret, forked)[0]


def _per_example(seed, batch, seq_len):
    """Each example's first row in the mask's row index (b·L, int32) and the seed, as (B,)
    operands: a batch shard carries its own."""
    base = jnp.arange(batch, dtype=jnp.int32) * jnp.int32(seq_len)
    return base, jnp.broadcast_to(jnp.asarray(seed, jnp.int32), (batch,))


def _fwd(y, dense_bias, residual, scale, bias, seed, rate, eps, interpret, forked):
    b, l, _ = y.shape
    base, seeds = _per_example(seed, b, l)
    y_bias, scale32, bias32 = (p.astype(jnp.float32) for p in (dense_bias, scale, bias))
    out, s, mean, rstd = _fwd_op(rate, eps, interpret)(base, seeds, y, y_bias, residual.astype(y.dtype),
                                                       scale32, bias32)
    # The zero-size arrays only carry the residual's and the parameters' dtypes to the backward.
    dtypes = tuple(jnp.zeros((0,), x.dtype) for x in (dense_bias, residual, scale, bias))
    return (out, out) if forked else out, (base, seeds, s, mean, rstd, scale32, jnp.asarray(seed), dtypes)


def _bwd(rate, eps, interpret, forked, residuals, d_out):
    base, seeds, s, mean, rstd, scale32, seed, (y_bias_like, r_like, scale_like, bias_like) = residuals
    douts = [d.astype(s.dtype) for d in (d_out if forked else (d_out,))]
    dy, dr, partial_sums = _bwd_op(rate, interpret, forked)(base, seeds, *douts, s, mean, rstd, scale32)
    dscale, dbias, dy_bias = partial_sums.sum((0, 1))
    return (dy, dy_bias.astype(y_bias_like.dtype), dr.astype(r_like.dtype),
            dscale.astype(scale_like.dtype), dbias.astype(bias_like.dtype),
            np.zeros(seed.shape, jax.dtypes.float0))


add_dropout_layer_norm.defvjp(_fwd, _bwd)
