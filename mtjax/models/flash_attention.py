"""Fused attention with dropout on the probabilities, for BERT's training step on GPUs.

BERT's recipe puts dropout on the attention probabilities, which neither cuDNN (through
`jax.nn.dot_product_attention`) nor XLA fuses: the written-out path stores several
(B, H, L, L) tensors per layer. These Pallas (Triton) kernels never store them. Forward
and backward follow FlashAttention-2 (Dao, 2023): the forward streams key blocks with an
online softmax and keeps only the row log-sum-exp; the backward recomputes the
probabilities block by block (one kernel for dQ, then one for dK/dV). The operands keep their
length (L = 500 for HICCAP's text): the tiles overhang it and every load and store is
masked, so no padded copies of q/k/v/dO or sliced copies of the results are made.

Dropout inside a kernel needs a mask that the backward can redraw without storing it, so
it is a counter-based hash of (example seed, head, row, column) — `keep_mask` — instead
of `nn.Dropout`'s threefry draw: same distribution (keep with 1 − rate, scale by
1/(1 − rate)), different bits. The example seeds, hash(seed, global batch index), are
computed outside the kernels. `attention_reference` computes the same function written
out (the fallback off GPU, and the tests' reference).

BERT calls them on its packed projection (`flash_attention_packed`): one matmul
x·[W_k | W_v | W_q] gives (B, L, 3, H, d), which the kernels read slot by slot where it lies,
adding the biases themselves (no unpacking pass): the forward adds b_q to its query rows once
and writes q + b_q for the backward; b_v enters each output row once, weighted
by the row's kept probability mass, and as dO·b_v in the backward's per-row `delta_kept`; b_k
is not read, as the softmax cancels it. The backward kernels write dK, dV and dQ into one
packed cotangent of that shape (the dQ kernel its QUERY slot, the dK/dV kernel the KEY and
VALUE slots of the same buffer), so the input gradient is one matmul and no three-way sum.
The backward makes no pass of its own over the (B, L, ...) arrays either: the dQ kernel
computes the softmax backward's delta = rowsum(dO ∘ O) for its rows (the dK/dV kernel reads
it), and every program stores the column sums of the tile it writes, from which the bias
gradient is a small sum.

Under batch sharding (mtjax/parallel.py) each kernel call is a `custom_partitioning`
operation split along the batch alone: each device runs the kernels on its own examples,
with their seeds, so a sharded step computes exactly the one-device function. (XLA's SPMD
partitioner has no rule for a Pallas call: it would gather q/k/v and run the whole batch
on every device.) On one device the kernels are lowered as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mtjax.models.batch_parallel import batch_parallel

# The counter hash and seed shared with the hidden-state dropout (`seed_from_key` is drawn
# once per layer and step from the layer's dropout key).
from mtjax.models.dropout import column_key, hash32 as _hash32, hash_keep
from mtjax.models.dropout import seed_from_key  # noqa: F401  (re-exported: attention.py's seed)

# Run the kernels in Pallas' interpreter (tests that drive the model path on the CPU).
INTERPRET = False

# Slots of the packed projection (B, L, 3, H, d): key and value first, so that the dK/dV
# kernel writes one (block, 2, d) tile of the packed cotangent.
KEY, VALUE, QUERY = 0, 1, 2

# Large finite instead of −inf for keys past the sequence: exp() of it is 0, and no inf − inf appears.
_MASKED = -1e30


def _batch_seeds(seed: jax.Array, batch: int) -> jax.Array:
    """(B,) per-example seeds. Computed in plain XLA, where an iota over the batch is
    partitioned with it, so a batch-sharded call draws each example's mask from its GLOBAL
    index: the kernels see only their shard's seeds, never a batch index of their own."""
    return _hash32(seed ^ _hash32(jnp.arange(batch, dtype=jnp.int32)))


def _row_keys(batch_seed: jax.Array, head: jax.Array, rows: jax.Array) -> jax.Array:
    """One key per (example seed, head, query row); columns are then hashed once each."""
    return _hash32(_hash32(batch_seed ^ _hash32(head)) ^ rows)


def _keep(row_keys: jax.Array, cols: jax.Array, rate: float) -> jax.Array:
    """(rows, cols) boolean keep-mask: P(keep) = 1 − rate (to 2⁻²⁴). Per element only
    `dropout.mix32` of the row key ^ the column key (the hidden dropout's row/column hash)."""
    return hash_keep(row_keys[:, None], column_key(cols)[None, :], rate)


def keep_mask(seed: jax.Array, batch: int, heads: int, q_len: int, k_len: int, rate: float) -> jax.Array:
    """The kernels' dropout mask as a (B, H, Lq, Lk) array (for the written-out path and tests)."""
    rows = jnp.arange(q_len, dtype=jnp.int32)
    cols = jnp.arange(k_len, dtype=jnp.int32)
    head_ids = jnp.arange(heads, dtype=jnp.int32)

    def example(batch_seed):  # (H, Lq, Lk)
        return jax.vmap(lambda h: _keep(_row_keys(batch_seed, h, rows), cols, rate))(head_ids)

    return jax.vmap(example)(_batch_seeds(seed, batch))


def unpack(kvq: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q, k, v), each (B, L, H, d), from the packed projection and its (3, H, d) bias, added
    in kvq's dtype as a Dense layer adds it."""
    return tuple(kvq[:, :, slot] + bias[slot].astype(kvq.dtype) for slot in (QUERY, KEY, VALUE))


def attention_reference(q, k, v, seed, rate: float):
    """The kernels' function written out: softmax(q·kᵀ/√d) in float32 → hash-mask dropout → ·v.
    q, k, v: (B, L, H, d); returns (B, Lq, H, d)."""
    b, lq, h, d = q.shape
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d)
    probs = jax.nn.softmax(scores, axis=-1)
    if rate > 0:
        keep = keep_mask(seed, b, h, lq, k.shape[1], rate)
        probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


# --------------------------------------------------------------------------- kernels

def _load(ref, valid):
    """A block of `ref`; rows past the sequence (`valid` False) read as 0 and are never
    touched in memory: the operands are unpadded, so those rows lie outside the array."""
    return ref[...] if valid is None else plgpu.load(ref, mask=valid, other=0)


def _store(ref, value, valid):
    if valid is None:
        ref[...] = value
    else:
        plgpu.store(ref, value, mask=valid)


def _in_sequence(positions, seq_len, padded_len):
    """Which of `positions` lie inside the sequence; None when the tiles cover it exactly."""
    return None if seq_len == padded_len else positions < seq_len


def _fwd_kernel(seed_ref, q_ref, k_ref, v_ref, bq_ref, bv_ref, o_ref, lse_ref, qb_ref, *, scale, rate,
                seq_len, padded_len, block_q, block_k):
    # q/k/v_ref: the projection as it comes (packed or not), before its biases bq/bv_ref (in its
    # dtype); the key bias is never read: it adds q·b_k to a whole row of scores, which the
    # softmax cancels. qb_ref: q + b_q, this program's rows, for the backward kernels.
    i, h = pl.program_id(0), pl.program_id(2)
    rows = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
    row_ok = _in_sequence(rows, seq_len, padded_len)
    row_ok2 = None if row_ok is None else row_ok[:, None]
    q = _load(q_ref, row_ok2)
    q = q + bq_ref[...].astype(q.dtype)[None, :]  # in q's dtype, as Dense adds it
    _store(qb_ref, q, row_ok2)
    row_keys = _row_keys(seed_ref[0], h, rows)

    def body(j, carry):
        acc, m, l, kept = carry
        keys = pl.ds(j * block_k, block_k)
        cols = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        col_ok = _in_sequence(cols, seq_len, padded_len)
        col_ok2 = None if col_ok is None else col_ok[:, None]
        k, v = _load(k_ref.at[keys, :], col_ok2), _load(v_ref.at[keys, :], col_ok2)
        s = plgpu.dot(q, k, trans_b=True) * scale
        if col_ok is not None:
            s = jnp.where(col_ok[None, :], s, _MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        l = l * alpha + jnp.sum(p, axis=1)  # the softmax normaliser counts dropped entries too
        if rate > 0:
            p = jnp.where(_keep(row_keys, cols, rate), p, 0.0)
            kept = kept * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l, kept

    stats = jnp.zeros((block_q,), jnp.float32)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), _MASKED, jnp.float32), stats, stats)
    acc, m, l, kept = lax.fori_loop(0, padded_len // block_k, body, init)
    # Σ_j p̃_ij (v_j + b_v) = Σ_j p̃_ij v_j + b_v Σ_j p̃_ij: the value bias enters once per row,
    # weighted by the row's kept probability mass (all of it without dropout).
    kept = kept if rate > 0 else l
    acc = acc + kept[:, None] * bv_ref[...].astype(jnp.float32)[None, :]
    _store(o_ref, (acc * (1.0 / ((1.0 - rate) * l))[:, None]).astype(o_ref.dtype), row_ok2)
    _store(lse_ref, m + jnp.log(l), row_ok)


def _probs_and_dscores(q, k, v, do, lse, delta, delta_kept, row_keys, cols, col_ok, *, scale, rate):
    """Backward block: recomputed probabilities, their dropped version, and dL/dscores.
    Rows past the sequence have q = dO = 0 (masked loads), so they add nothing to dK/dV.
    The value bias is in `delta_kept` (`_dq_kernel`): v here is without it."""
    s = plgpu.dot(q, k, trans_b=True) * scale
    p = jnp.exp(s - lse[:, None])
    if col_ok is not None:
        p = jnp.where(col_ok[None, :], p, 0.0)
    dp = plgpu.dot(do, v, trans_b=True)
    if rate > 0:
        keep = _keep(row_keys, cols, rate)
        p_dropped = jnp.where(keep, p, 0.0) * (1.0 / (1.0 - rate))
        # dS = P ∘ (dP̃ − delta), dP̃ = keep ∘ (dO·(v + b_v)) / (1 − rate): kept entries
        # P ∘ (dO·v / (1 − rate) − delta_kept), dropped ones −P ∘ delta.
        return p_dropped, p * jnp.where(keep, dp * (1.0 / (1.0 - rate)) - delta_kept[:, None], -delta[:, None])
    return p, p * (dp - delta_kept[:, None])


def _column_sums(tile, valid):
    """float32 column sums of a tile as stored (in the cotangent's dtype), rows past the
    sequence counted as 0: this program's share of the packed bias's gradient. (Those rows
    are 0 already, from the masked loads; the mask keeps the sum from relying on it.)"""
    tile = tile.astype(jnp.float32)
    if valid is not None:
        tile = jnp.where(valid, tile, 0.0)
    return jnp.sum(tile, axis=0)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, bv_ref, do_ref, lse_ref, o_ref, dq_ref, delta_ref, delta_kept_ref,
               dq_sums_ref, *, scale, rate, seq_len, padded_len, block_q, block_k):
    # q_ref: q + b_q (the forward's qb); k/v_ref: as the forward read them, bv_ref: the value
    # bias. dq_ref: this block's tile of the packed cotangent's QUERY slot (the dK/dV kernel,
    # run next, fills the rest of the buffer); delta/delta_kept_ref: its rows' softmax-backward
    # terms, which that kernel reads.
    i, h = pl.program_id(0), pl.program_id(2)
    rows = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
    row_ok = _in_sequence(rows, seq_len, padded_len)
    row_ok2 = None if row_ok is None else row_ok[:, None]
    q, do = _load(q_ref, row_ok2), _load(do_ref, row_ok2)
    lse = _load(lse_ref, row_ok)
    # delta = rowsum(dO ∘ O) in float32, here where dO is loaded anyway: no pass of its own over O.
    do32 = do.astype(jnp.float32)
    delta = jnp.sum(_load(o_ref, row_ok2).astype(jnp.float32) * do32, axis=1)
    # The value bias adds dO·b_v to every kept entry of dP̃ (scaled as they are): folded into
    # the delta those entries subtract, so the loops see v without it.
    bias_term = jnp.sum(do32 * bv_ref[...].astype(jnp.float32)[None, :], axis=1)
    delta_kept = delta - bias_term * (1.0 / (1.0 - rate))
    _store(delta_ref, delta, row_ok)
    _store(delta_kept_ref, delta_kept, row_ok)
    row_keys = _row_keys(seed_ref[0], h, rows)

    def body(j, dq):
        keys = pl.ds(j * block_k, block_k)
        cols = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        col_ok = _in_sequence(cols, seq_len, padded_len)
        col_ok2 = None if col_ok is None else col_ok[:, None]
        k, v = _load(k_ref.at[keys, :], col_ok2), _load(v_ref.at[keys, :], col_ok2)
        _, ds = _probs_and_dscores(q, k, v, do, lse, delta, delta_kept, row_keys, cols, col_ok,
                                   scale=scale, rate=rate)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, padded_len // block_k, body, jnp.zeros(q.shape, jnp.float32))
    dq = (dq * scale).astype(dq_ref.dtype)
    _store(dq_ref, dq, row_ok2)
    dq_sums_ref[...] = _column_sums(dq, row_ok2)


def _dkdv_kernel(seed_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, delta_kept_ref, _dkvq_ref, dkv_ref,
                 dkv_sums_ref, *, scale, rate, seq_len, padded_len, block_q, block_k):
    # _dkvq_ref: the packed cotangent holding dQ, aliased to dkv_ref and never read.
    j, h = pl.program_id(0), pl.program_id(2)
    cols = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
    col_ok = _in_sequence(cols, seq_len, padded_len)
    col_ok2 = None if col_ok is None else col_ok[:, None]
    k, v = _load(k_ref, col_ok2), _load(v_ref, col_ok2)
    seed = seed_ref[0]

    def body(i, carry):
        dk, dv = carry
        rows_slice = pl.ds(i * block_q, block_q)
        rows = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
        row_ok = _in_sequence(rows, seq_len, padded_len)
        row_ok2 = None if row_ok is None else row_ok[:, None]
        q, do = _load(q_ref.at[rows_slice, :], row_ok2), _load(do_ref.at[rows_slice, :], row_ok2)
        lse, delta = _load(lse_ref.at[rows_slice], row_ok), _load(delta_ref.at[rows_slice], row_ok)
        delta_kept = _load(delta_kept_ref.at[rows_slice], row_ok)
        p_dropped, ds = _probs_and_dscores(q, k, v, do, lse, delta, delta_kept, _row_keys(seed, h, rows), cols,
                                           col_ok, scale=scale, rate=rate)
        dv = dv + plgpu.dot(p_dropped.astype(do.dtype), do, trans_a=True)
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, padded_len // block_q, body, (zeros, zeros))
    # dkv_ref: this block's (block_k, 2, d) tile of the packed cotangent, slots KEY and VALUE;
    # dkv_sums_ref: their (2, d) column sums, in the same slot order.
    for slot, tile in ((KEY, dk * scale), (VALUE, dv)):
        tile = tile.astype(dkv_ref.dtype)
        _store(dkv_ref.at[:, jnp.int32(slot), :], tile, col_ok2)
        dkv_sums_ref[jnp.int32(slot), :] = _column_sums(tile, col_ok2)


# --------------------------------------------------------------------------- wrappers

@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes (powers of two) and Triton launch settings. The defaults are the fastest
    of those timed on an H100 at BERT-base shape (`python -m mtjax.bench_attention`); three
    pipeline stages instead of two were 0.2–0.4 ms faster per b32 train step in four
    alternating pairs (docs/perf_notes.md, change 32)."""

    fwd_q: int = 128
    fwd_k: int = 64
    bwd_q: int = 64
    bwd_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def parse(cls, text: str) -> "Blocks":
        """'128x64x64x64x4x3' (fwd_q x fwd_k x bwd_q x bwd_k x warps x stages)."""
        return cls(*(int(n) for n in text.split("x")))

    def __str__(self) -> str:
        return "x".join(str(getattr(self, f.name)) for f in dataclasses.fields(self))


def _padded_len(seq_len: int, blocks: Blocks) -> int:
    tile = max(blocks.fwd_q, blocks.fwd_k, blocks.bwd_q, blocks.bwd_k)  # powers of two
    return -(-seq_len // tile) * tile


class _Plan:
    """Static settings of one kernel call on (B, L, H, d) operands of any batch size (the
    local one under sharding): block specs, grid, kernel keyword arguments. The tiles cover
    L rounded up to the largest tile (500 -> 512); the kernels mask the rows past L in every
    load and store, so the operands need no padded copies. `packed`: the projection the
    kernels read is BERT's packed (B, L, 3, H, d) array, each of q/k/v a slot of it, instead
    of three (B, L, H, d) arrays (`source_*`)."""

    def __init__(self, shape, rate: float, blocks: Blocks, interpret: bool, packed: bool):
        self.batch, seq_len, self.heads, self.depth = shape
        self.packed = packed
        self.padded_len = _padded_len(seq_len, blocks)
        self.common = dict(scale=1.0 / math.sqrt(self.depth), rate=rate, seq_len=seq_len,
                           padded_len=self.padded_len)
        params = None if interpret else plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
        self.call_args = dict(compiler_params=params, interpret=interpret)

    def row_block(self, size):
        """(None, size, None, d) blocks of a (B, L, H, d) array, indexed by the grid's first axis."""
        return pl.BlockSpec((None, size, None, self.depth), lambda n, b, h: (b, n, h, 0))

    def whole_rows(self):
        return pl.BlockSpec((None, self.padded_len, None, self.depth), lambda n, b, h: (b, 0, h, 0))

    def source_block(self, size, slot):
        """`row_block` of the projection's q, k or v (`slot`), packed or not."""
        return self.packed_block(size, slot) if self.packed else self.row_block(size)

    def source_rows(self, slot):
        """`whole_rows` of the projection's q, k or v (`slot`), packed or not."""
        if not self.packed:
            return self.whole_rows()
        return pl.BlockSpec((None, self.padded_len, None, None, self.depth), lambda n, b, h: (b, 0, slot, h, 0))

    def bias_block(self, slot):
        """(d,) blocks of a (3, H, d) bias: this head's part of `slot`'s bias."""
        return pl.BlockSpec((None, None, self.depth), lambda n, b, h: (slot, h, 0))

    def stats_block(self, size):
        return pl.BlockSpec((None, None, size), lambda n, b, h: (b, h, n))

    def whole_stats(self):
        return pl.BlockSpec((None, None, self.padded_len), lambda n, b, h: (b, h, 0))

    def grid(self, block):
        return (self.padded_len // block, self.batch, self.heads)

    def packed_block(self, size, slot):
        """(None, size, None, None, d) blocks of one slot of a packed (B, L, 3, H, d) array."""
        return pl.BlockSpec((None, size, None, None, self.depth), lambda n, b, h: (b, n, slot, h, 0))

    def key_value_block(self, size):
        """(None, size, 2, None, d): the KEY and VALUE slots of a packed array together."""
        return pl.BlockSpec((None, size, 2, None, self.depth), lambda n, b, h: (b, n, 0, h, 0))

    def packed_shape(self, seq_len):
        return (self.batch, seq_len, 3, self.heads, self.depth)

    def sums_block(self):
        """(d,) blocks of (B, n_blocks, H, d) column sums: one per program."""
        return pl.BlockSpec((None, None, None, self.depth), lambda n, b, h: (b, n, h, 0))

    def key_value_sums_block(self):
        """(2, d) blocks of (B, n_blocks, 2, H, d) column sums: one per program, slots KEY and VALUE."""
        return pl.BlockSpec((None, None, 2, None, self.depth), lambda n, b, h: (b, n, 0, h, 0))

    def sums_shape(self, block, *slots):
        return (self.batch, self.padded_len // block, *slots, self.heads, self.depth)


# The (B,) per-example seeds: each program reads its example's one.
_SEED_SPEC = pl.BlockSpec((1,), lambda n, b, h: (b,))


def _query_shape(source, packed: bool):
    """(B, L, H, d) of the projection's q, from the packed array or q itself."""
    return (*source.shape[:2], *source.shape[3:]) if packed else source.shape


def _source_rule(packed: bool) -> str:
    return "b l s h d" if packed else "b l h d"


@functools.lru_cache(maxsize=None)
def _fwd_op(rate: float, blocks: Blocks, interpret: bool, packed: bool):
    """(seeds, q, k, v, bias (3, H, d) in the projection's dtype) -> out, lse (B, H, L) float32,
    and q + b_q (B, L, H, d). q, k, v: three (B, L, H, d) arrays, or when `packed` the one
    packed projection passed three times (each call reads its slot)."""
    def call(batch_seeds, q, k, v, bias):
        plan = _Plan(_query_shape(q, packed), rate, blocks, interpret, packed)
        bq, bk = blocks.fwd_q, blocks.fwd_k
        query_shape = jax.ShapeDtypeStruct(_query_shape(q, packed), q.dtype)
        return tuple(pl.pallas_call(
            functools.partial(_fwd_kernel, block_q=bq, block_k=bk, **plan.common),
            grid=plan.grid(bq),
            in_specs=[_SEED_SPEC, plan.source_block(bq, QUERY), plan.source_rows(KEY), plan.source_rows(VALUE),
                      plan.bias_block(QUERY), plan.bias_block(VALUE)],
            out_specs=[plan.row_block(bq), plan.stats_block(bq), plan.row_block(bq)],
            out_shape=[query_shape, jax.ShapeDtypeStruct((plan.batch, plan.heads, q.shape[1]), jnp.float32),
                       query_shape],
            name="flash_attention_fwd", **plan.call_args,
        )(batch_seeds, q, k, v, bias, bias))

    src = _source_rule(packed)
    return batch_parallel(call, f"b, {src}, {src}, {src}, s h d -> b l h d, b h l, b l h d")


@functools.lru_cache(maxsize=None)
def _dq_op(rate: float, blocks: Blocks, interpret: bool, packed: bool):
    """(seeds, q + b_q, k, v (as `_fwd_op` took them), bias, dO, lse, O) -> the packed
    cotangent with dQ in its QUERY slot (the other slots unwritten), delta and delta_kept
    (B, H, L) float32, and dQ's column sums (B, n_q, H, d)."""
    def call(batch_seeds, qb, k, v, bias, do, lse, out):
        plan = _Plan(qb.shape, rate, blocks, interpret, packed)
        bq, bk = blocks.bwd_q, blocks.bwd_k
        stats = jax.ShapeDtypeStruct(lse.shape, jnp.float32)
        return tuple(pl.pallas_call(
            functools.partial(_dq_kernel, block_q=bq, block_k=bk, **plan.common),
            grid=plan.grid(bq),
            in_specs=[_SEED_SPEC, plan.row_block(bq), plan.source_rows(KEY), plan.source_rows(VALUE),
                      plan.bias_block(VALUE), plan.row_block(bq), plan.stats_block(bq), plan.row_block(bq)],
            out_specs=[plan.packed_block(bq, QUERY), plan.stats_block(bq), plan.stats_block(bq), plan.sums_block()],
            out_shape=[jax.ShapeDtypeStruct(plan.packed_shape(qb.shape[1]), qb.dtype), stats, stats,
                       jax.ShapeDtypeStruct(plan.sums_shape(bq), jnp.float32)],
            name="flash_attention_dq", **plan.call_args,
        )(batch_seeds, qb, k, v, bias, do, lse, out))

    src = _source_rule(packed)
    return batch_parallel(call, f"b, b l h d, {src}, {src}, s h d, b l h d, b h l, b l h d"
                                " -> b l s h d, b h l, b h l, b n h d")


@functools.lru_cache(maxsize=None)
def _dkdv_op(rate: float, blocks: Blocks, interpret: bool, packed: bool):
    """(seeds, q + b_q, k, v, dO, lse, delta, delta_kept, packed cotangent from `_dq_op`) ->
    that cotangent with dK and dV in its KEY and VALUE slots (written in place), and their
    column sums (B, n_k, 2, H, d)."""
    def call(batch_seeds, qb, k, v, do, lse, delta, delta_kept, dkvq):
        plan = _Plan(qb.shape, rate, blocks, interpret, packed)
        bq, bk = blocks.bwd_q, blocks.bwd_k
        return tuple(pl.pallas_call(
            functools.partial(_dkdv_kernel, block_q=bq, block_k=bk, **plan.common),
            grid=plan.grid(bk),
            in_specs=[_SEED_SPEC, plan.whole_rows(), plan.source_block(bk, KEY), plan.source_block(bk, VALUE),
                      plan.whole_rows(), plan.whole_stats(), plan.whole_stats(), plan.whole_stats(),
                      plan.key_value_block(bk)],
            out_specs=[plan.key_value_block(bk), plan.key_value_sums_block()],
            out_shape=[jax.ShapeDtypeStruct(dkvq.shape, dkvq.dtype),
                       jax.ShapeDtypeStruct(plan.sums_shape(bk, 2), jnp.float32)],
            input_output_aliases={8: 0},  # dkvq (operand 8) is output 0: dK, dV go into its KEY, VALUE slots
            name="flash_attention_dkdv", **plan.call_args,
        )(batch_seeds, qb, k, v, do, lse, delta, delta_kept, dkvq))

    src = _source_rule(packed)
    return batch_parallel(call, f"b, b l h d, {src}, {src}, b l h d, b h l, b h l, b h l, b l s h d"
                                " -> b l s h d, b n kv h d")


def _packed_cotangent(rate, blocks, interpret, packed, residuals, d_out):
    """The (B, L, 3, H, d) cotangent of the projection (dK, dV, dQ in their slots) and the
    kernels' float32 column sums of it, per program: (B, n_q, H, d) of the QUERY slot and
    (B, n_k, 2, H, d) of the KEY and VALUE slots."""
    qb, k, v, bias, seed, out, lse = residuals
    operands = (_batch_seeds(seed, qb.shape[0]), qb, k, v)
    dkvq, delta, delta_kept, dq_sums = _dq_op(rate, blocks, interpret, packed)(*operands, bias, d_out, lse, out)
    dkvq, dkv_sums = _dkdv_op(rate, blocks, interpret, packed)(*operands, d_out, lse, delta, delta_kept, dkvq)
    return dkvq, dq_sums, dkv_sums


def _attention_fwd(q, k, v, bias, seed, rate, blocks, interpret, packed):
    """The forward kernel on the projection (`_fwd_op`); returns out and the backward's residuals."""
    out, lse, qb = _fwd_op(rate, blocks, interpret, packed)(_batch_seeds(seed, q.shape[0]), q, k, v, bias)
    return out, (qb, k, v, bias, seed, out, lse)


def _flash_fwd(q, k, v, seed, rate, blocks, interpret):
    no_bias = jnp.zeros((3, *q.shape[2:]), q.dtype)
    return _attention_fwd(q, k, v, no_bias, seed, rate, blocks, interpret, packed=False)


def _no_gradient(seed):
    """The integer seed's (empty) cotangent."""
    return np.zeros(seed.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def flash_attention(q, k, v, seed, rate: float = 0.0, blocks: Blocks = Blocks(), interpret: bool = False):
    """softmax(q·kᵀ/√d) → dropout(rate, mask `keep_mask(seed, ...)`) → ·v, fused.

    q, k, v: (B, L, H, d) with the same L (self-attention); seed: int32 scalar array;
    returns (B, L, H, d) in q's dtype. Softmax statistics and accumulators are float32.
    `interpret=True` runs the kernels in Pallas' interpreter (CPU tests)."""
    return _flash_fwd(q, k, v, seed, rate, blocks, interpret)[0]


def _flash_bwd(rate, blocks, interpret, residuals, d_out):
    dkvq, _, _ = _packed_cotangent(rate, blocks, interpret, False, residuals, d_out)  # no bias: no sums needed
    return dkvq[:, :, QUERY], dkvq[:, :, KEY], dkvq[:, :, VALUE], _no_gradient(residuals[4])


flash_attention.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def flash_attention_packed(kvq, bias, seed, rate: float = 0.0, blocks: Blocks = Blocks(), interpret: bool = False):
    """`flash_attention` on a packed projection: kvq (B, L, 3, H, d) holds key, value and
    query (slots KEY, VALUE, QUERY) before their (3, H, d) bias, which is added in kvq's
    dtype (`unpack`'s function). The kernels read the slots where they lie and add the
    biases themselves: q + b_q once per query row (the forward writes it for the backward),
    b_v through the rows' kept probability mass, b_k not at all (the softmax cancels it).
    Gradients: one packed cotangent, and the bias's summed in float32."""
    return _packed_fwd(kvq, bias, seed, rate, blocks, interpret)[0]


def _packed_fwd(kvq, bias, seed, rate, blocks, interpret):
    out, residuals = _attention_fwd(kvq, kvq, kvq, bias.astype(kvq.dtype), seed, rate, blocks, interpret, packed=True)
    return out, (residuals, bias)


def _bias_gradient(dq_sums, dkv_sums):
    """The packed bias's (3, H, d) float32 gradient, the cotangent summed over batch and
    length, from the kernels' per-program column sums: a sum over (B, n_blocks) only. Placed
    into its slots, not concatenated (KEY, VALUE are slots 0 and 1, as `key_value_block` has them).
    The KEY slot's is the column sums of dK, 0 up to rounding: the key bias cancels in the softmax."""
    d_bias = jnp.zeros((3, *dq_sums.shape[2:]), jnp.float32)
    d_bias = d_bias.at[QUERY].set(jnp.sum(dq_sums, axis=(0, 1)))
    return d_bias.at[KEY:VALUE + 1].set(jnp.sum(dkv_sums, axis=(0, 1)))


def _packed_bwd(rate, blocks, interpret, residuals, d_out):
    flash_residuals, bias = residuals
    dkvq, dq_sums, dkv_sums = _packed_cotangent(rate, blocks, interpret, True, flash_residuals, d_out)
    return dkvq, _bias_gradient(dq_sums, dkv_sums).astype(bias.dtype), _no_gradient(flash_residuals[4])


flash_attention_packed.defvjp(_packed_fwd, _packed_bwd)
