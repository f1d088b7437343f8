"""The LSTM recurrence as one persistent GPU kernel per direction of time (forward, backward).

Written with `lax.scan`, each of the 63 steps of HICCAP's joint recurrence is a few small
kernels (the h·W_hh matmul, the gates, the copies), each a few microseconds of launch and
latency with most of the chip idle; the four scans of a train step (two layers, forward and
backward) cost ~2.2 ms on the H100 (docs/perf_notes.md). Here one Pallas (Triton) kernel
runs all the steps of a scan. Program (z, j) of its grid owns the hidden units
[j·U, (j+1)·U) of direction z: it loads its columns of W_hh once (the four gates' U columns,
H × 4U), keeps its cell state in registers, and each step reads the whole previous hidden
state of its direction, computes its units' gates and states and writes them. The
programs of one direction then meet at a barrier (an atomic counter per direction, spun on)
before the next step reads the hidden state they wrote together. The backward kernel is
the mirror image: each program computes its units' gate gradients, and after the barrier
reads all of them to form its units' share of dh_{t-1} = dgates_t · W_hhᵀ.

A spinning barrier needs every program resident at once: `supported` takes a call only if
its grid fits the GPU's multiprocessors (HICCAP's four directions × 512 / 16 units: 128 of
the H100's 132) and its batch fits the tiles (up to 32, in bf16 or fp16);
`lstm.BiLSTM(impl='kernel')` runs the scan otherwise. XLA runs one kernel at a time on its
stream, so nothing else holds the multiprocessors for long: a kernel of another stream or
process only delays the programs it keeps off, but a process capped to a share of the
multiprocessors (CUDA MPS) would keep some waiting for good, so not there. Under vmap the
calls run one after another (`_one_call_at_a_time`), never as one bigger grid. In Pallas'
interpreter (CPU tests) the programs run one after another, so there each direction is one
program (the barrier is then passed at once), which runs the same arithmetic.

Arithmetic as in `lstm.recurrence`: the h·W_hh product in the compute dtype with float32
accumulation, rounded to the compute dtype, then added in float32 to the projected input
and b_hh; gates, cell state and hidden state in float32. Layouts are batch-first:
projected (B, T, Z, 4H), hidden and cell states (B, T, Z, H), in scan order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Hidden units per program on the GPU (a power of two, at least 16: Triton's smallest dot;
# 32 overflows shared memory at H = 512).
UNITS_PER_PROGRAM = 16
NUM_WARPS = 4
# The largest batch the kernels take (padded up to a power of two): each program holds a
# (B, H) hidden-state tile forward and a (B, 4H) gate-gradient tile backward, and B = 32 is
# what fits Triton's shared memory beside the weights at H = 512.
MAX_BATCH = 32
# Run the kernels in Pallas' interpreter (CPU tests).
INTERPRET = False


def _padded_batch(batch: int) -> int:
    return max(16, 1 << (batch - 1).bit_length())


def _units_per_program(hidden: int) -> int:
    return hidden if INTERPRET else UNITS_PER_PROGRAM


def _multiprocessors() -> int:
    return getattr(jax.devices()[0], "core_count", 0) or 0


def supported(batch: int, directions: int, hidden: int, dtype) -> bool:
    """Whether the kernels take this call: on a GPU (or in the interpreter), a 16-bit compute
    dtype and the batch within `MAX_BATCH` (the tiles' shared memory: in float32 the backward's
    gate-gradient tile alone would be 256 KB), the hidden size a multiple of the units per
    program (powers of two: Triton's tiles), and every program resident at once (directions ×
    H / U no more than the GPU's multiprocessors), as the spinning barrier needs. Otherwise
    the LSTM runs as a scan."""
    if INTERPRET:
        return True
    if jax.default_backend() != "gpu" or jnp.dtype(dtype).itemsize != 2 or _padded_batch(batch) > MAX_BATCH:
        return False
    units = UNITS_PER_PROGRAM
    return hidden % units == 0 and hidden & (hidden - 1) == 0 and directions * hidden // units <= _multiprocessors()


def _barrier(counter_ref, z, step):
    """Waits until every program of direction z has finished step `step` (0-based): each
    adds 1 to the direction's counter when done and spins until it reaches programs ×
    (step + 1). The CTA barrier first makes every thread's stores part of the release."""
    if not INTERPRET:
        plgpu.debug_barrier()
    target = pl.num_programs(1) * (step + 1)
    one, zero = jnp.ones((), jnp.int32), jnp.zeros((), jnp.int32)
    arrived = plgpu.atomic_add(counter_ref, (z,), one) + 1
    # Polled with atomics (acquire): polling with plain volatile loads let the next step read
    # unwritten slots on the H100 (NaNs), as those loads order nothing.
    lax.while_loop(lambda seen: seen < target, lambda _: plgpu.atomic_add(counter_ref, (z,), zero), arrived)


def _load(ref, idx):
    # Volatile: never a stale L1 line of what other programs just wrote. (Pallas' "cg" cache
    # modifier, the other way, is refused by its own lowering in jax 0.10-0.11.)
    return plgpu.load(ref.at[idx], volatile=not INTERPRET)


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _dot(a, b, dtype, trans_b=False):
    """a·b (or a·bᵀ) in `dtype` with float32 accumulation, rounded to `dtype`, as float32."""
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    out = plgpu.dot(a.astype(dtype), b, trans_b=trans_b, precision=precision)
    return out.astype(dtype).astype(jnp.float32)


def _split_gates(x, units):
    """(B, 4U) gate columns of one program, ordered (gate, unit) -> the four (B, U) gates.
    (Triton tensors cannot be sliced: a masked sum over the gate axis picks each.)"""
    x3 = x.reshape(x.shape[0], 4, units)
    gate = lax.broadcasted_iota(jnp.int32, x3.shape, 1)
    return [jnp.sum(jnp.where(gate == k, x3, 0.0), axis=1) for k in range(4)]


def _join_gates(parts, units):
    """The inverse of `_split_gates`: four (B, U) -> (B, 4U)."""
    batch = parts[0].shape[0]
    gate = lax.broadcasted_iota(jnp.int32, (batch, 4, units), 1)
    x3 = jnp.zeros((batch, 4, units), jnp.float32)
    for k, part in enumerate(parts):
        x3 = jnp.where(gate == k, part[:, None, :], x3)
    return x3.reshape(batch, 4 * units)


def _forward_kernel(proj_ref, w_ref, b_ref, _counter_in, hs_ref, hq_ref, cs_ref, acts_ref, counter_ref, *,
                    steps: int, units: int, dtype):
    z, j = pl.program_id(0), pl.program_id(1)
    own = pl.ds(j * units, units)
    tile = pl.ds(j * 4 * units, 4 * units)     # this program's gate columns, (gate, unit) order
    w = w_ref[z, :, tile]                      # (H, 4U), loaded once
    b = b_ref[z, tile][None, :]
    batch = proj_ref.shape[0]
    is_g = lax.broadcasted_iota(jnp.int32, (batch, 4 * units), 1) // units == 2

    def step(t, carry):
        c, proj_t = carry
        proj_next = proj_ref[:, jnp.minimum(t + 1, steps - 1), z, tile]  # prefetched for step t + 1
        h_prev = _load(hq_ref, (slice(None), jnp.maximum(t - 1, 0), z, slice(None)))
        h_prev = jnp.where(t > 0, h_prev, jnp.zeros_like(h_prev))  # zero initial state (unwritten slot at t = 0)
        pre = proj_t + _dot(h_prev, w, dtype) + b
        act = jnp.where(is_g, jnp.tanh(pre), _sigmoid(pre))
        i, f, g, o = _split_gates(act, units)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        hs_ref[:, t, z, own] = h
        hq_ref[:, t, z, own] = h.astype(hq_ref.dtype)
        cs_ref[:, t, z, own] = c
        acts_ref[:, t, z, tile] = act
        _barrier(counter_ref, z, t)
        return c, proj_next

    lax.fori_loop(0, steps, step, (jnp.zeros((batch, units), jnp.float32), proj_ref[:, 0, z, tile]))


def _backward_kernel(dhs_ref, cs_ref, acts_ref, w_ref, _counter_in, dgates_ref, dq_ref, counter_ref, *,
                     steps: int, units: int, dtype):
    z, j = pl.program_id(0), pl.program_id(1)
    own = pl.ds(j * units, units)
    tile = pl.ds(j * 4 * units, 4 * units)
    w_rows = w_ref[z, own, :]                  # (U, 4H): our units' rows of W_hh, loaded once
    batch = dhs_ref.shape[0]

    def step(r, dc_next):
        t = steps - 1 - r
        # dh_t through h_t's use at step t+1: all gate gradients of step t+1 · W_hhᵀ (our rows).
        dq = _load(dq_ref, (slice(None), jnp.minimum(t + 1, steps - 1), z, slice(None)))
        dh_rec = _dot(dq, w_rows, dtype, trans_b=True)
        dh = dhs_ref[:, t, z, own] + jnp.where(r > 0, dh_rec, 0.0)
        c_t = cs_ref[:, t, z, own]
        c_p = jnp.where(t > 0, cs_ref[:, jnp.maximum(t - 1, 0), z, own], 0.0)
        i, f, g, o = _split_gates(acts_ref[:, t, z, tile], units)
        tc = jnp.tanh(c_t)
        dc = dc_next + dh * o * (1.0 - tc * tc)
        grads = _join_gates((dc * g * i * (1.0 - i), dc * c_p * f * (1.0 - f), dc * i * (1.0 - g * g),
                             dh * tc * o * (1.0 - o)), units)
        dgates_ref[:, t, z, tile] = grads
        dq_ref[:, t, z, tile] = grads.astype(dq_ref.dtype)
        _barrier(counter_ref, z, r)
        return dc * f

    lax.fori_loop(0, steps, step, jnp.zeros((batch, units), jnp.float32))


def _call_params():
    return dict(interpret=INTERPRET,
                compiler_params=None if INTERPRET else plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1))


def _pad_batch(x):
    return jnp.pad(x, ((0, _padded_batch(x.shape[0]) - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def to_kernel_order(x):
    """x (..., 4H) with gate columns in PyTorch's order (gate-major: i, f, g, o, each H units)
    -> the kernels' order: grouped by program, each program's U units of the four gates
    together, so that a program's gate columns are one contiguous tile. A transpose, not a
    gather, so its gradient is a transpose too (not a scatter)."""
    hidden = x.shape[-1] // 4
    units = _units_per_program(hidden)
    x = x.reshape(*x.shape[:-1], 4, hidden // units, units)
    return jnp.swapaxes(x, -3, -2).reshape(*x.shape[:-3], 4 * hidden)


def _one_call_at_a_time(call):
    """`call` with a batching rule that runs it once per slice of the vmapped axis. Pallas'
    own rule would add a grid axis, so more programs than the barrier lets be resident (and
    one counter for all of them); under vmap (the per-task backward of train_step) the
    kernels run one after another instead."""
    op = custom_vmap(call)

    @op.def_vmap
    def _(axis_size, in_batched, *args):
        outs = [op(*(a[n] if batched else a for a, batched in zip(args, in_batched))) for n in range(axis_size)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
        return stacked, jax.tree.map(lambda _: True, stacked)

    return op


@functools.lru_cache(maxsize=None)
def _forward_op(dtype):
    return _one_call_at_a_time(functools.partial(_forward, dtype=dtype))


@functools.lru_cache(maxsize=None)
def _backward_op(dtype):
    return _one_call_at_a_time(functools.partial(_backward, dtype=dtype))


def _forward(projected, w_hh, b_hh, dtype):
    """hs, cs, acts of the batch padded to a power of two (kept so for the backward)."""
    projected = _pad_batch(projected)
    b, steps, z, h4 = projected.shape
    hidden = h4 // 4
    units = _units_per_program(hidden)
    state = jax.ShapeDtypeStruct((b, steps, z, hidden), jnp.float32)
    kernel = functools.partial(_forward_kernel, steps=steps, units=units, dtype=dtype)
    hs, _, cs, acts, _ = pl.pallas_call(
        kernel, grid=(z, hidden // units),
        out_shape=(state, jax.ShapeDtypeStruct(state.shape, dtype), state,
                   jax.ShapeDtypeStruct(projected.shape, jnp.float32), jax.ShapeDtypeStruct((z,), jnp.int32)),
        input_output_aliases={3: 4}, **_call_params(),
    )(projected, w_hh.astype(dtype), b_hh, jnp.zeros((z,), jnp.int32))
    return hs, cs, acts


def _backward(dhs, cs, acts, w_hh, dtype):
    """Gate gradients of the padded batch (dhs, cs, acts all padded)."""
    b, steps, z, hidden = dhs.shape
    units = _units_per_program(hidden)
    kernel = functools.partial(_backward_kernel, steps=steps, units=units, dtype=dtype)
    dgates, _, _ = pl.pallas_call(
        kernel, grid=(z, hidden // units),
        out_shape=(jax.ShapeDtypeStruct(acts.shape, jnp.float32), jax.ShapeDtypeStruct(acts.shape, dtype),
                   jax.ShapeDtypeStruct((z,), jnp.int32)),
        input_output_aliases={4: 2}, **_call_params(),
    )(dhs, cs, acts, w_hh.astype(dtype), jnp.zeros((z,), jnp.int32))
    return dgates


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def recurrence(projected, w_hh, b_hh, dtype):
    """`lstm.recurrence` in batch-first layout: projected (B, T, Z, 4H) float32, w_hh
    (Z, H, 4H) float32 (cast to `dtype` for the matmul), b_hh (Z, 4H) -> hs (B, T, Z, H).
    The gate columns (last axis of projected, w_hh, b_hh) in `to_kernel_order`."""
    return _forward_op(jnp.dtype(dtype))(projected, w_hh, b_hh)[0][:projected.shape[0]]


def _recurrence_fwd(projected, w_hh, b_hh, dtype):
    hs, cs, acts = _forward_op(jnp.dtype(dtype))(projected, w_hh, b_hh)
    return hs[:projected.shape[0]], (w_hh, hs, cs, acts)  # residuals of the padded batch


def _recurrence_bwd(dtype, res, dhs):
    w_hh, hs, cs, acts = res
    batch = dhs.shape[0]
    # The padded rows' cotangents are zero, so are their gate gradients: they add nothing below.
    dgates = _backward_op(jnp.dtype(dtype))(_pad_batch(dhs), cs, acts, w_hh)
    h_prev = jnp.pad(hs[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0)))
    # The recurrent weight's gradient over all steps at once (B·T rows): operands in the
    # compute dtype, float32 accumulation, as every other weight gradient of the step.
    d_w = jnp.einsum("btzh,btzg->zhg", h_prev.astype(dtype), dgates.astype(dtype),
                     preferred_element_type=jnp.float32).astype(w_hh.dtype)
    return dgates[:batch], d_w, jnp.sum(dgates, axis=(0, 1))


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
